"""Generation speed: raytron's KV-cache decoding against `transformers`' `generate`.

    python bench/generate.py     # ~3 minutes on 2 cores; writes docs/benchmarks.md

For each model shape, one raytron GPT with random weights and the same weights exported
to a transformers `LlamaForCausalLM` (`model/hf.py`, as `raytron export` does); the
same prompts (random token ids, all of one length), greedy, as many new tokens on both
sides (no end token), the same torch thread count, in one process. Measured, best of
five: the time to the first token (a prefill and one token) and the decode speed,
(batch x (new - 1) tokens) / (time for `new` tokens - time for one), at batch 1 and 8.
Both sides must generate the same tokens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.model.families import FAMILIES  # noqa: E402
from raytron.model.generate import generate_ids  # noqa: E402
from raytron.model.gpt import GPT, GPTShape  # noqa: E402
from raytron.model.hf import hf_config, to_hf  # noqa: E402
from raytron.model.sampling import Sampling  # noqa: E402

THREADS = 2
REPEATS = 5
SHAPES = {  # name: (shape, prompt tokens, new tokens)
    "tiny (1.3M)": (GPTShape(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                             vocab_size=2048, max_seq_len=256, tie_embeddings=False), 32, 128),
    "gpt2-124m shape (88M)": (GPTShape(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
                                       ffn_hidden=2048, vocab_size=4096, max_seq_len=512),
                              64, 64),
}


def transformers_twin(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**hf_config(model.shape, FAMILIES["llama"], "float32", None, 0, 0))
    twin = LlamaForCausalLM(config).eval()
    twin.load_state_dict(to_hf(model.state_dict(), model.shape, FAMILIES["llama"]), strict=False)
    twin.tie_weights()
    return twin


def best_time(run) -> tuple[float, list]:
    times, result = [], None
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def raytron_run(model: GPT, prompts: torch.Tensor, new: int):
    return lambda: generate_ids(model, prompts.tolist(), new, Sampling(greedy=True)).ids


def transformers_run(twin, prompts: torch.Tensor, new: int):
    def run():
        with torch.inference_mode():
            out = twin.generate(prompts, attention_mask=torch.ones_like(prompts),
                                max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()
    return run


def measure(runner, model, prompts: torch.Tensor, new: int) -> tuple[float, float, list]:
    """(time to first token in s, decode tokens/s, the generated ids)."""
    runner(model, prompts, new)()  # warm-up
    first, _ = best_time(runner(model, prompts, 1))
    whole, ids = best_time(runner(model, prompts, new))
    return first, len(prompts) * (new - 1) / (whole - first), ids


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = []
    for name, (shape, prompt_len, new) in SHAPES.items():
        model = GPT(shape, seed=0).eval()
        twin = transformers_twin(model)
        for batch in (1, 8):
            prompts = torch.randint(0, shape.vocab_size, (batch, prompt_len),
                                    generator=torch.Generator().manual_seed(batch))
            ours = measure(raytron_run, model, prompts, new)
            theirs = measure(transformers_run, twin, prompts, new)
            same = "yes" if ours[2] == theirs[2] else "NO"
            rows.append([name, str(batch), f"{prompt_len} + {new}",
                         f"{ours[0] * 1000:.1f}", f"{theirs[0] * 1000:.1f}",
                         f"{ours[1]:.0f}", f"{theirs[1]:.0f}", f"{ours[1] / theirs[1]:.2f}x",
                         same])
            print(" | ".join(rows[-1]), flush=True)
    import transformers

    table = markdown_table(
        ["model", "batch", "prompt + new tokens", "raytron first token (ms)",
         "transformers first token (ms)", "raytron decode (tok/s)",
         "transformers decode (tok/s)", "decode ratio", "same tokens"], rows)
    print(table)
    write_section("generate", f"""## Generation (`bench/generate.py`)

`python bench/generate.py` on {machine()}, transformers {transformers.__version__};
{THREADS} torch threads, fp32, greedy, best of {REPEATS}. Random weights, the same in
both (raytron's GPT and its export as `LlamaForCausalLM`); prompts of random token ids,
all of one length; every sequence generates all its new tokens. Decode speed is
(batch x (new - 1)) / (time for all new tokens - time for the first): the steps after
the prefill. Target: raytron at least 1.5x transformers' decode tokens/s on CPU.
A decode step of the 88M model reads all its weights (352 MB in fp32) whatever the
framework, which caps both near the same speed at batch 1; the difference lies in
what each step costs beyond the matmuls, which weighs most on small models.

{table}
""")


if __name__ == "__main__":
    main()
