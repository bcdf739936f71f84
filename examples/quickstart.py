"""moeflux quickstart: open a model, evaluate, generate, chat, snapshot and rewind.

Runs top to bottom in a few seconds on a tiny synthetic model that it makes on first
use (random weights in the real mlx-community layout, converted into a moeflux model
directory), so the text it prints is noise; point MODEL_DIR at a converted real model
for real text. The model is cached in ~/.cache/moeflux/quickstart, or in
$MOEFLUX_QUICKSTART_DIR when set.

    python examples/quickstart.py
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

import moeflux
from moeflux.prep.convert import convert
from moeflux.prep.synth import tiny_config, write_checkpoint

# ---- 1. A model directory. `python -m moeflux.prep convert CHECKPOINT DIR` makes one
# from any MLX checkpoint; here a tiny synthetic Qwen3.5-MoE-style one (4 layers:
# 3 linear-attention + 1 full attention, 8 experts, 2 active per token).
cache = Path(os.environ.get("MOEFLUX_QUICKSTART_DIR",
                            Path.home() / ".cache" / "moeflux" / "quickstart"))
MODEL_DIR = cache / "model"
if not (MODEL_DIR / "moeflux.json").exists():
    write_checkpoint(cache / "checkpoint", tiny_config("qwen3_5_moe"), seed=0)
    convert(cache / "checkpoint", MODEL_DIR, progress=False)

# ---- 2. Open it and evaluate token ids: numpy float32 logits of the last position.
model = moeflux.Model(MODEL_DIR)
print(model)
print(f"{model.architecture}: {model.n_layer} layers, vocabulary {model.vocab_size}, "
      f"{model.expert_bytes_per_token} expert bytes read per token")

ids = model.tokenize("The capital of France is")
logits = model.eval(ids)                       # [n_vocab]
top5 = np.argsort(-logits)[:5]
print("prompt ids:", ids)
print("top-5 next tokens:", [(int(t), model.detokenize([t])) for t in top5])
print("position:", model.n_past)

# ---- 3. Generate, streaming text pieces as they come (temperature 0 = greedy).
print("greedy: ", end="")
for step in model.generate("Hello, world!", max_tokens=16):
    print(step.text, end="", flush=True)
print(f"\n[{step.n_generated} tokens, {step.generation_tps:.1f} tokens/s, "
      f"finish: {step.finish_reason}]")
sampled = model.generate_text("Hello, world!", max_tokens=16, temperature=0.8,
                              top_p=0.95, seed=42)
print("sampled:", repr(sampled))

# ---- 4. Chat: the model's chat template renders the conversation.
prompt = model.apply_chat_template([{"role": "user", "content": "What is moeflux?"}])
print(prompt, end="")
print(model.generate_text(prompt, max_tokens=12, add_special_tokens=False))

# ---- 5. Snapshots: save the sequence, branch off, come back. A snapshot is bytes
# (picklable, or written to a file with save_state(path)), so a long shared prefix is
# evaluated once and reused.
model.reset()
model.eval(model.tokenize("Once upon a time"))
snapshot = model.save_state()
print(f"snapshot: {len(snapshot)} bytes at position {model.n_past}")
branch_a = model.generate_text(" there", max_tokens=8, reset=False)
model.load_state(snapshot)
branch_a_again = model.generate_text(" there", max_tokens=8, reset=False)
assert branch_a == branch_a_again   # bit-for-bit the same continuation
model.load_state(snapshot)
branch_b = model.generate_text(" a dragon", max_tokens=8, reset=False)
print("branch a:", repr(branch_a), "| branch b:", repr(branch_b))

# ---- 6. Rewind: truncate to an earlier position. Exact for attention-only models;
# for hybrid models like this one, exact at recent evaluation end points (others
# raise StateError and leave the sequence as it was).
model.load_state(snapshot)
start = model.n_past
model.eval(model.tokenize(" in a land"))
model.truncate(start)
print("rewound to", model.n_past)
try:
    model.truncate(start - 1)
except moeflux.errors.StateError as exc:
    print("cannot rewind there exactly:", str(exc).split(".")[0])

# ---- 7. Log-probabilities per generated token, and prompt reuse: generate keeps
# the longest prefix the sequence already shares with the new prompt (here the
# whole first prompt), so only the new tokens are evaluated.
steps = list(model.generate("The capital of France is", max_tokens=3, logprobs=True,
                            top_logprobs=2))
print("logprobs:", [(s.token, round(s.logprob, 3), s.top_logprobs) for s in steps])
again = list(model.generate(model.tokens + [steps[-1].token], max_tokens=2))
print(f"reused {again[0].n_reused} of {again[0].n_prompt} prompt tokens")

# ---- 8. Counters: tokens evaluated, expert reads and bytes.
print({k: round(v, 4) if isinstance(v, float) else v for k, v in model.stats().items()})

# ---- 9. Several sequences at once: each Model is one sequence; Model.share reuses
# the loaded weights, and evaluations in different threads run in parallel.
other = moeflux.Model.share(model)
results: dict = {}


def complete(name: str, m: moeflux.Model, text: str) -> None:
    results[name] = m.generate_text(text, max_tokens=6)


threads = [threading.Thread(target=complete, args=("first", model, "One, two")),
           threading.Thread(target=complete, args=("second", other, "Hello"))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("parallel:", results)

other.close()
model.close()
