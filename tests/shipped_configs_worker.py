"""Run every shipped config for a few steps inside one torchrun job (tests/test_shipped_configs.py).

    torchrun --nproc_per_node N tests/shipped_configs_worker.py OUT MODEL_DIR

One process group serves all configs, so the job pays torch's import once per rank rather than once
per config. Each config runs through ``train.main`` exactly as the command line would, with a tiny
model and tiny data injected by overrides; rank 0 prints one ``RESULT`` line per config.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

import train  # noqa: E402
from spl.distributed import exit_process, init_distributed  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
DATA = {"hh": FIXTURES / "hh_rlhf_sample.jsonl", "preference": FIXTURES / "hh_rlhf_sample_split.jsonl"}


def main() -> None:
    out, model = Path(sys.argv[1]), sys.argv[2]
    env = init_distributed()
    results = {}
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        fmt = (yaml.safe_load(config.read_text()).get("data") or {}).get("format", "preference")
        argv = [str(config), f"model.checkpoint={model}", f"data.train_path={DATA[fmt]}", "data.max_len=96",
                "data.max_prompt_len=64", "data.eval_size=4", "train.max_steps=2", "train.log_every=1",
                f"train.out_dir={out / f'{config.stem}_{env.world_size}'}"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = train.main(argv)
        results[config.stem] = {"rc": rc, "stderr": err.getvalue()[-2000:]}
    if env.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(0)  # without interpreter finalization (gloo teardown, pytorch#179291)


if __name__ == "__main__":
    main()
