"""Microcontroller (Cortex-M4) projects.

The generator (``tvm-scalpel compile --target cortex-m4 -o OUT_DIR``): graph.py reads the ONNX
model as a chain of layers, steps.py picks each layer's kernel and constants, kernels.py writes
the kernels in TIR and has TVM's ``c`` target print them, plan.py lays the activations out in
one static arena, emit.py writes the C files, project.py the folder and its model.json.

The runner (``tvm-scalpel run OUT_DIR``): firmware.py builds a firmware around the project
(firmware_template/), runs it under qemu-system-arm and counts the instructions of its model
call; manifest.py reads and checks model.json.
"""
