"""How probe scales with the model: random-weight Llama models of three shapes, with SmolLM2's tokenizer.

    PROBE_DATA=../shared/lama python benchmarks/scale.py [--shapes 135m,1.7b,8b] [--steps 20] [--full] [--pack N]
        [--relations P1376,P36,...] [--no-manual]

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
import tempfile
import threading
import time
from pathlib import Path

import torch

from probe.backends import backend_class, gguf_cache_folder, smollm2_gguf
from probe.cells import InProcess, LoadedModel
from probe.commands.common import execute
from probe.commands.eval import eval_cells
from probe.commands.train import train_cells
from probe.data import open_data
from probe.fit import config_fields
from probe.methods import get_method, method_config
from probe.options import load_template_spec
from probe.pack import default_pack, packed
from probe.runs import RunConfig, RunFolder
from probe.vocab import CandidateChoice

SHAPES = {  # config overrides of SmolLM2-135M's
    "135m": {},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128},
}


def random_model(shape: str, device: str, dtype: torch.dtype):
    """A backend over a Llama of the shape's config with random weights (drawn on the device), SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = gguf_cache_folder(smollm2_gguf())
    config = AutoConfig.from_pretrained(folder)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return backend_class(config, "causal")(model, tokenizer, f"random-{shape}", device)


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


def run_cells(loaded, data, cells, run, desc) -> dict:
    (results,) = execute(InProcess(data, loaded=loaded), [run], cells, desc, log=lambda m: None)
    return results


def bench(shape: str, args, data, out: Path) -> dict:
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    backend = random_model(shape, device, torch.bfloat16)
    load_s = time.time() - t0
    choice = CandidateChoice("common")
    candidates = choice.build(backend.tokenizer, data)
    loaded = LoadedModel(backend, data, candidates)
    ids = args.relations.split(",") if args.relations else list(data.relations)
    row = {"shape": shape, "device": device, "params_b": sum(p.numel() for p in backend.model.parameters()) / 1e9,
           "load_s": round(load_s, 1)}

    if not args.no_manual:
        row.update(manual(backend, data, candidates, loaded, ids, args, out / f"{shape}-manual"))
    row.update(ptuning(backend, data, candidates, loaded, ids, args, device, out / f"{shape}-ptuning"))
    del loaded, backend
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def manual(backend, data, candidates, loaded, ids, args, folder: Path) -> dict:
    """Manual prompts on the relations: facts a second."""
    config = RunConfig.of("eval", backend, data, candidates, method="manual", split="test_34k", vocab="common",
                          batch_size=args.batch_size).to_dict()
    run = RunFolder(folder, config)
    t0 = time.time()
    results = run_cells(loaded, data, eval_cells(loaded.spec, run, ids, "test_34k", args.batch_size), run, "eval")
    seconds = time.time() - t0
    facts = results["summary"]["all"]["facts"]
    return dict(manual_s=round(seconds, 1), manual_facts_per_s=round(facts / seconds, 1),
                manual_macro_p1=round(results["summary"]["all"]["macro_p1"], 3))


def ptuning(backend, data, candidates, loaded, ids, args, device: str, folder: Path) -> dict:
    """Packed P-tuning on the relations: prompt-steps a second, wall time, GPU busy share, peak memory."""
    method = get_method("ptuning")
    settings = {} if args.full else {"min_steps": args.steps, "epochs": 1, "max_train": args.steps * 16,
                                     "eval_every": args.steps, "retries": 0}
    fit_config = method.fit_config(**{k: v for k, v in settings.items() if k in config_fields(method.fit_config_class)})
    pack = args.pack or default_pack(device)
    config = RunConfig.of("train", backend, data, candidates, method="ptuning", split="test_34k", vocab="common",
                          batch_size=128, pack=pack).to_dict()
    run = RunFolder(folder, config)
    cells = train_cells(loaded.spec, backend, data, ids, run, "ptuning", method_config("ptuning"), fit_config,
                        load_template_spec(None, "ptuning"), "test_34k")
    t0 = time.time()
    with BusySampler() as busy:
        results = run_cells(loaded, data, packed(cells, pack), run, "train")
    seconds = time.time() - t0
    steps = sum(json.loads((run.root / r["relation"] / "config.json").read_text())["steps"] for r in results["relations"])
    return dict(pack=pack, train_s=round(seconds, 1), prompt_steps=steps, prompt_steps_per_s=round(steps / seconds, 2),
                train_macro_p1=round(results["summary"]["all"]["macro_p1"], 3), gpu_busy=busy.summary(),
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
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temporary folder)")
    args = parser.parse_args()
    shapes = (args.shapes or ("135m,1.7b,8b" if args.device.startswith("cuda") else "135m")).split(",")
    data = open_data(None)
    out = args.out or Path(tempfile.mkdtemp(prefix="probe-scale-"))
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for shape in shapes:
        print(json.dumps(bench(shape, args, data, out)), flush=True)


if __name__ == "__main__":
    main()
