"""moeflux.prep — model preparation.

Turns an mlx-community style checkpoint (sharded safetensors + config.json) into the
streaming model directory the engine opens, and writes synthetic checkpoints of any
supported architecture for tests and demos.

Modules:
    safetensors_io   bounded-memory safetensors reading and streaming writing
    synth            synthetic MLX-layout checkpoints
    extract_weights  non-expert tensors -> model_weights.bin + model_weights.json
    repack_experts   routed experts -> packed_experts/layer_NN.bin + layout.json
    convert          both steps plus config/tokenizer copy and moeflux.json
    verify           checks a model directory against its source

Run ``python -m moeflux.prep --help`` for the command line.
"""
