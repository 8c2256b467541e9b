"""Train with SFT, SPL (DPO when alpha == beta) or a Bradley-Terry reward model.

    torchrun train.py                                 # the embedded opinion demo (CPU, minutes)
    torchrun train.py train.alpha=0.1                 # the same demo as DPO: watch it collapse
    torchrun --nproc_per_node 8 train.py configs/hh_rlhf_spl.yaml train.alpha=0.2
    python train.py --help

Arguments: an optional YAML file listing what differs from the defaults in spl/config.py, then
dotted ``section.key=value`` overrides (values parsed as YAML).
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from spl.config import Config
        print("Defaults:\n" + Config().to_yaml())
        return 0
    import torch.distributed as dist

    from spl.chat_templates import ChatTemplateError
    from spl.checkpoint import CheckpointError
    from spl.config import ConfigError, load_config
    from spl.data import DataError
    from spl.distributed import TrainingError, init_distributed, world_size_from_env
    from spl.reporting import ReportingError
    from spl.trainer import batch_layout, run

    # Every rank reads the same files and agrees on collective outcomes (spl/distributed.py), so
    # the errors below are the same on every rank: rank 0 alone reports them.
    main_rank = int(os.environ.get("RANK", 0)) == 0
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as e:
        if main_rank:
            print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    try:
        batch_layout(cfg.train, world_size_from_env())  # before the process group and any weights
    except TrainingError as e:
        if main_rank:
            print(f"train.py: {e}", file=sys.stderr)
        return 1
    owns_group = not dist.is_initialized()  # a caller's process group (tests) is left running
    env = init_distributed()
    if env.is_main:
        print("resolved config:\n" + cfg.to_yaml())
    try:
        if cfg.data.train_path is None:
            from spl.demo import run_demo
            run_demo(cfg, env)
        else:
            run(cfg, env)
    except (TrainingError, DataError, CheckpointError, ReportingError, ChatTemplateError) as e:
        if main_rank:
            print(f"train.py: {e}", file=sys.stderr)
        return 1
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from spl.distributed import exit_process

    exit_process(main())  # multi-rank: without interpreter finalization (pytorch#179291)
