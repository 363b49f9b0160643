"""How probe scales with the model: random-weight Llama models of three shapes, with SmolLM2's tokenizer.

    PROBE_DATA=../shared/lama python benchmarks/scale.py [--shapes 135m,1.7b,8b] [--steps 20] [--full] [--pack N]
        [--relations P1376,P36,...] [--no-manual] [--tokenizer DIR]

`--tokenizer DIR`: a folder holding only a tokenizer and a config.json (SmolLM2's: copy tokenizer*.json,
special_tokens_map.json and config.json from the converted folder), so that it runs where the SmolLM2 package is not,
such as a borrowed GPU machine. It runs through the Python API (probe.evaluate, probe.train), as a notebook would.

Random weights need no download; the shapes set the cost: 135m is SmolLM2-135M's config, 1.7b has hidden size 2048
and 24 layers, 8b hidden size 4096, 32 layers and 8 key/value heads. For each shape it prints:
- manual prompts on all 41 relations: facts a second, once the model is loaded;
- packed P-tuning on all 41 relations: prompt-steps a second over `--steps` steps of each relation (with --full, the
  default training, and its wall time);
- peak memory (the GPU's, else the process's resident memory);
- how busy the GPU was (nvidia-smi's utilization, sampled every 0.2 s) while training, on a GPU.
On a CPU the default is the 135m shape alone. Figures go in BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import threading
import time
from pathlib import Path

import torch

import probe

SHAPES = {  # config overrides of SmolLM2-135M's
    "135m": {},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128},
}


def random_model(shape: str, device: str, dtype: torch.dtype, tokenizer_dir: Path | None = None) -> probe.Model:
    """A Llama of the shape's config with random weights (drawn on the device), with SmolLM2's tokenizer and config
    (from `tokenizer_dir`, else the converted SmolLM2 folder)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = probe.model_folder("smollm2") if tokenizer_dir is None else tokenizer_dir
    config = AutoConfig.from_pretrained(folder)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return probe.Model.from_hf(model, tokenizer, f"random-{shape}", device)


class BusySampler:
    """nvidia-smi's GPU utilization, sampled in a thread while inside (an empty list without nvidia-smi)."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples, self.stop = every, [], threading.Event()

    def __enter__(self) -> BusySampler:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(self.every)

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        return f"mean {sum(self.samples) / len(self.samples):.0f} %, peak {max(self.samples):.0f} %"


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(shape: str, args, out: Path | None) -> dict:
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = random_model(shape, device, torch.bfloat16, args.tokenizer)
    load_s = time.time() - t0
    ids = args.relations.split(",") if args.relations else "all"
    row = {"shape": shape, "device": device, "params_b": sum(p.numel() for p in model.hf_model.parameters()) / 1e9,
           "load_s": round(load_s, 1)}
    if not args.no_manual:
        row.update(manual(model, ids, args, out / f"{shape}-manual" if out else None))
    row.update(ptuning(model, ids, args, device, out / f"{shape}-ptuning" if out else None))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def manual(model: probe.Model, ids, args, folder: Path | None) -> dict:
    """Manual prompts on the relations: facts a second."""
    t0 = time.time()
    results = probe.evaluate(model, relations=ids, method="manual", batch_size=args.batch_size, out=folder)
    seconds = time.time() - t0
    return dict(manual_s=round(seconds, 1), manual_facts_per_s=round(results.n_facts / seconds, 1),
                manual_macro_p1=round(results.macro_p1, 3))


def ptuning(model: probe.Model, ids, args, device: str, folder: Path | None) -> dict:
    """Packed P-tuning on the relations: prompt-steps a second, wall time, GPU busy share, peak memory."""
    settings = {} if args.full else {"min_steps": args.steps, "epochs": 1, "max_train": args.steps * 16,
                                     "eval_every": args.steps, "retries": 0}
    pack = args.pack  # None: the device's default (probe train's)
    t0 = time.time()
    with BusySampler() as busy:
        results = probe.train(model, relations=ids, method="ptuning", pack=pack, out=folder, **settings)
    seconds = time.time() - t0
    steps = sum(p.config["steps"] for p in results.prompts.values())
    return dict(pack=pack or "default", train_s=round(seconds, 1), prompt_steps=steps, prompt_steps_per_s=round(steps / seconds, 2),
                train_macro_p1=round(results.macro_p1, 3), gpu_busy=busy.summary(),
                peak_memory_gib=round(peak_memory_gib(device), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma list of 135m, 1.7b, 8b (default: all on a GPU, 135m on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each relation (without --full)")
    parser.add_argument("--full", action="store_true", help="the default training of `probe train`, timed whole")
    parser.add_argument("--pack", type=int, default=None, help="prompts trained at once (default: the device's)")
    parser.add_argument("--relations", default=None, help="comma list of relations (default: all 41)")
    parser.add_argument("--no-manual", action="store_true", help="skip the manual-prompt evaluation")
    parser.add_argument("--batch-size", type=int, default=128, help="facts per evaluation batch")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: none written)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a folder with only a tokenizer and a config.json (default: the converted SmolLM2 folder)")
    args = parser.parse_args()
    shapes = (args.shapes or ("135m,1.7b,8b" if args.device.startswith("cuda") else "135m")).split(",")
    probe.load_data()  # the data is there before any model is drawn
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for shape in shapes:
        print(json.dumps(bench(shape, args, args.out)), flush=True)


if __name__ == "__main__":
    main()
