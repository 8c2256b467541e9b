"""The embedded default: the paper's opinion example in miniature (§3.1-3.2, Prop. 3.1/3.2/A.1).

A few multiple-choice opinion questions each carry a population distribution over answers.
1. A tiny Mistral is fitted (SFT, full fine-tuning) to a reference policy: uniform answers, a
   base model with no opinion of its own.
2. LoRA adapters on top of it train with SPL on pairwise preferences drawn from the population
   (Bradley-Terry with reward log p_pop, so p_best = p_pop); the reference is the same weights
   with adapters disabled.
3. It prints, per question, the population, the DPO theory (pi ∝ ref * p^(1/beta)), the SPL
   theory (pi ∝ ref^(beta/alpha) * p^(1/alpha)) and what the trained model assigns, each as the
   model's sequence probabilities renormalized over the four answers.
With alpha = 1 SPL reproduces the population (proportional representation); with alpha == beta
(``train.alpha=0.1``) the same run is DPO and collapses onto the majority answer.
"""

from __future__ import annotations

import io
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from spl.config import Config, ModelConfig

# (question, options, population share of each option as the most preferred answer)
QUESTIONS: list[tuple[str, list[str], list[float]]] = [
    ("Which season do you like best?", ["Spring", "Summer", "Autumn", "Winter"], [0.55, 0.20, 0.15, 0.10]),
    ("Which pet would you rather have?", ["Dog", "Cat", "Fish", "Bird"], [0.45, 0.35, 0.12, 0.08]),
    ("How should a city spend a budget surplus?", ["Schools", "Transit", "Parks", "Tax cuts"],
     [0.40, 0.25, 0.20, 0.15]),
    ("What do you drink first in the morning?", ["Coffee", "Tea", "Juice", "Water"],
     [0.50, 0.25, 0.15, 0.10]),
]
LETTERS = "ABCD"
COMPARISONS_PER_PAIR = 100  # comparisons drawn for each pair of options of each question
REFERENCE_SAMPLES = 64  # SFT answers per question, each option equally often (uniform reference)


def format_prompt(question: str, options: list[str]) -> str:
    lines = [f"Question: {question}"] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def answers(options: list[str]) -> list[str]:
    return [f" {LETTERS[i]}. {o}" for i, o in enumerate(options)]


def train_demo_tokenizer(path: Path) -> None:
    """A small BPE SentencePiece model of the demo's text, with Mistral's special ids (unk 0, bos 1,
    eos 2, no pad), so the whole demo runs without downloading anything."""
    import sentencepiece as spm

    lines = []
    for q, opts, _ in QUESTIONS:
        lines.append(format_prompt(q, opts))
        lines.extend(answers(opts))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=buf, model_type="bpe", vocab_size=160,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        split_by_whitespace=True, num_threads=1, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def reference_records(seed: int) -> list[dict]:
    """SFT records: every option of every question equally often (a uniform reference policy)."""
    records = []
    for q, opts, _ in QUESTIONS:
        for k in range(REFERENCE_SAMPLES):
            records.append({"prompt": format_prompt(q, opts), "response": answers(opts)[k % len(opts)]})
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[k] for k in perm]


def preference_records(seed: int) -> list[dict]:
    """Pairs from the population: each pair of options is compared by ``COMPARISONS_PER_PAIR`` raters,
    of whom a share p_i / (p_i + p_j) (Bradley-Terry with reward log p) prefer i. The counts are
    stratified (rounded, not drawn), so the demo shows the method rather than sampling noise."""
    records = []
    for q, opts, pop in QUESTIONS:
        prompt, ans = format_prompt(q, opts), answers(opts)
        for i in range(len(opts)):
            for j in range(i + 1, len(opts)):
                wins = round(COMPARISONS_PER_PAIR * pop[i] / (pop[i] + pop[j]))
                for k in range(COMPARISONS_PER_PAIR):
                    chosen, rejected = (ans[i], ans[j]) if k < wins else (ans[j], ans[i])
                    records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[k] for k in perm]


@torch.no_grad()
def answer_distributions(model, tokenizer, *, adapters: bool = True) -> list[torch.Tensor]:
    """Per question, the model's sequence probabilities of the four answers, renormalized."""
    from spl.logprobs import sequence_logps
    from spl.lora import disable_adapters, lora_modules

    out = []
    ctx = disable_adapters(model) if (not adapters and lora_modules(model)) else nullcontext()
    model.eval()
    with ctx:
        for q, opts, _ in QUESTIONS:
            prompt = [tokenizer.bos_id] + tokenizer.encode(format_prompt(q, opts))
            seqs = [prompt + tokenizer.encode(a) + [tokenizer.eos_id] for a in answers(opts)]
            T = max(map(len, seqs))
            ids = torch.tensor([s + [tokenizer.pad_id] * (T - len(s)) for s in seqs])  # (4, T)
            targets = torch.cat([ids[:, 1:], torch.full((4, 1), tokenizer.pad_id)], dim=1)  # (4, T)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for r, s in enumerate(seqs):
                mask[r, len(prompt) - 1:len(s) - 1] = True  # targets that are answer tokens
            dev = model.lm_head.weight.device
            h = model(ids.to(dev), return_hidden=True)
            logps = sequence_logps(h, model.lm_head.weight, targets.to(dev), mask.to(dev), impl="plain")
            out.append(torch.softmax(logps.double().cpu(), dim=0))
    return out


def theory(ref: torch.Tensor, pop: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """SPL's optimal policy over the options (Prop. A.1): ref^(beta/alpha) * p_best^(1/alpha)."""
    logits = (beta / alpha) * ref.log() + pop.log() / alpha
    return torch.softmax(logits, dim=0)


def report(ref_dists, trained_dists, alpha: float, beta: float) -> tuple[str, list[dict]]:
    """A table per question and the numbers behind it (also written as JSON)."""
    lines, rows = [], []
    kind = "DPO (alpha == beta)" if alpha == beta else f"SPL alpha={alpha:g} beta={beta:g}"
    lines.append(f"Opinion demo: {kind}; global temperature alpha/beta = {alpha / beta:g}")
    for (q, opts, pop), ref, got in zip(QUESTIONS, ref_dists, trained_dists, strict=True):
        pop_t = torch.tensor(pop, dtype=torch.float64)
        dpo = theory(ref, pop_t, beta, beta)
        spl = theory(ref, pop_t, alpha, beta)
        tv = 0.5 * (got - spl).abs().sum().item()
        lines.append(f"\n{q}")
        lines.append(f"  {'option':<10}{'population':>11}{'reference':>11}{'DPO theory':>12}"
                     f"{'SPL theory':>12}{'trained':>9}")
        for i, o in enumerate(opts):
            lines.append(f"  {o:<10}{pop[i]:>11.3f}{ref[i].item():>11.3f}{dpo[i].item():>12.5f}"
                         f"{spl[i].item():>12.3f}{got[i].item():>9.3f}")
        lines.append(f"  total variation(trained, theory) = {tv:.3f}")
        rows.append({"question": q, "options": opts, "population": pop, "reference": ref.tolist(),
                     "dpo_theory": dpo.tolist(), "spl_theory": spl.tolist(), "trained": got.tolist(),
                     "tv_to_theory": tv})
    return "\n".join(lines), rows


def demo_model_config(vocab_size: int, preset: str = "tiny") -> ModelConfig:
    """The demo model: a preset's shape (``model.preset``) over the demo tokenizer's vocabulary."""
    from dataclasses import replace

    return replace(ModelConfig.preset(preset), vocab_size=vocab_size, max_seq_len=256)


def run_demo(cfg: Config, env) -> dict:
    """Fit the reference (or reuse it), train SPL on the population's preferences, print the table."""
    from dataclasses import replace

    from spl.checkpoint import load_model, save_model
    from spl.data import PreferenceDataset, SFTDataset
    from spl.lora import apply_lora
    from spl.model import Transformer
    from spl.tokenizer import Tokenizer
    from spl.trainer import DistEnv, Trainer, TrainingError, print0

    if cfg.train.divergence != "reverse_kl":  # the table compares with SPL's theory, not f-DPO's
        raise TrainingError(f"the embedded demo trains SPL/DPO only; train.divergence={cfg.train.divergence} "
                            "(f-DPO) needs data.train_path")
    out = Path(cfg.train.out_dir)
    ref_dir = out / "reference"
    tok_path = ref_dir / "tokenizer.model"
    data_kw = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len)
    # The demo's prompts are plain text; saved so that sample.py and evaluate.py pose them the same way.
    if cfg.data.chat_template not in ("auto", "none"):
        raise TrainingError("the embedded demo trains on plain text: data.chat_template must be auto or "
                            f"none, got {cfg.data.chat_template!r}")
    cfg.data.chat_template = "none"
    if not (ref_dir / "config.json").is_file() and env.is_main:
        # Stage 1: the reference policy, full fine-tuning from random weights. Rank 0 alone fits it
        # (seconds) and the others wait: identical on every launch, and no sharding of a toy model.
        fresh = out / "reference_run" / "tokenizer.model"
        train_demo_tokenizer(fresh)
        tok = Tokenizer(fresh, "none")
        torch.manual_seed(cfg.train.seed)
        model = Transformer(demo_model_config(tok.vocab_size, cfg.model.preset)).to(env.device)
        sft_cfg = replace(cfg, lora=replace(cfg.lora, enabled=False),
                          train=replace(cfg.train, mode="sft", lr=3e-3, max_steps=200, warmup_steps=10,
                                        out_dir=str(out / "reference_run"), resume=False, overwrite=True,
                                        ref_cache=None, eval_every=10**9, save_every=10**9, report_to=[]))
        sft = SFTDataset.from_records(reference_records(cfg.train.seed), tok, **data_kw)
        print0(env, f"stage 1/2: fitting the reference policy ({len(sft)} answers, uniform over options)")
        Trainer(sft_cfg, DistEnv(device=env.device), model, sft, tokenizer_path=str(fresh)).train()
        save_model(model, model.cfg, ref_dir, overwrite=True)
        (ref_dir / "tokenizer.model").write_bytes(fresh.read_bytes())
        # The config that fitted it says how it reads prompts (chat template "none") to sample.py
        # and evaluate.py, which are pointed at this directory too (base model, difficulty source).
        (ref_dir / "config.yaml").write_text(sft_cfg.to_yaml())
    _barrier(env)
    tok = Tokenizer(tok_path, "none")
    model, _ = load_model(ref_dir, device=env.device)
    ref_dists = answer_distributions(model, tok)
    # Stage 2: SPL with LoRA; the reference is the same weights with adapters disabled.
    torch.manual_seed(cfg.train.seed)
    apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               targets=tuple(cfg.lora.targets))
    pairs = PreferenceDataset.from_records(preference_records(cfg.train.seed + 1), tok, **data_kw)
    t = cfg.train
    print0(env, f"stage 2/2: {'DPO' if t.alpha == t.beta else 'SPL'} alpha={t.alpha:g} beta={t.beta:g} "
                f"on {len(pairs)} preference pairs drawn from the population")
    trainer = Trainer(cfg, env, model, pairs, tokenizer_path=str(tok_path), base_path=str(ref_dir.resolve()))
    trainer.train()
    trained = answer_distributions(model, tok)
    text, rows = report(ref_dists, trained, t.alpha, t.beta)
    if env.is_main:
        print(text)
        (out / "demo_results.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\ncheckpoint: {trainer.latest_checkpoint()}  (python sample.py --global-temp 2 uses it)")
    return {"rows": rows}


def _barrier(env) -> None:
    if env.world_size > 1:
        torch.distributed.barrier()
