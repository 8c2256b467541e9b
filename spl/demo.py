"""The embedded default: the paper's social-choice claim on real survey questions, in a minute on a CPU.

Six GlobalOpinionQA questions (Durmus et al. 2023; ``spl/survey.py`` states how they are read):
four with the United States' answer shares as the population, and two on which countries disagree
sharply, with those countries' preferences pooled (each country counts equally). Per question,
p_best(y) is the population's share of answer y (Prop. A.1).

1. Reference: a tiny Mistral, full fine-tuning from random weights (SFT), learns to answer every
   question uniformly over its options, in the format "<prompt> <letter></s>": a base model with
   no opinion of its own that always answers with one option letter and stops.
2. Policy: LoRA adapters train with SPL on pairwise preferences drawn from the population:
   Bradley-Terry with reward log p_best, each pair of options compared ``COMPARISONS`` times and a
   share p_i / (p_i + p_j) of them (rounded, not sampled) preferring i, plus comparisons that every
   option wins against every non-answer (``preference_pairs``). The reference is the same weights
   with adapters disabled.
3. It prints, per question, the population (each country's shares too when pooled), the
   reference, DPO's theory pi ∝ ref p^(1/beta) (Prop. 3.1), SPL's pi ∝ ref^(beta/alpha)
   p^(1/alpha) (Prop. 3.2/A.1) and the trained model, and which countries' top answers a
   distribution erases (gives less than half of their share in the pool).

Two choices keep a minute of CPU enough and the answers well-formed:
- The demo's tokenizer holds each whole prompt as one token (``train_tokenizer``), so the model
  is in effect a table of answer distributions, one row per question: the unconstrained policy
  of Prop. A.1, trained through the real tokenizer, LoRA, log-prob, loss, trainer and checkpoint
  code.
- A preference pair compares the two option letters alone, one token each. The "</s>" that ends
  an answer is format, learned in step 1 and left out of the comparison, so the trained
  distribution over answers is exactly the next-token distribution over option letters that
  ``evaluate.py --suite opinions`` reads (App. D).

With alpha = 1 SPL reproduces the population (proportional representation). DPO (alpha == beta)
would put nearly everything on the majority answer: its theory column shows where. The sweep over
alpha on all 181 US questions and a pooled set, with trained DPO models, is
``experiments/opinions.py``; the same functions train it.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import torch

from spl.config import Config, ModelConfig
from spl.demo_answers import (
    QUESTIONS_FILE,
    answer_distributions,
    answer_text,
    demo_questions,
    erased_groups,
    shorten,
    theory,
    total_variation,
    well_formed_mass,
    write_questions,
)
from spl.survey import (
    MISSING_RULE,
    POOLING_RULE,
    SurveyQuestion,
)

COMPARISONS = 400  # per pair of options (the rounding of p_i / (p_i + p_j) moves it <= 0.00125)
NON_ANSWER_COMPARISONS = 30  # per (option, token that is no answer): keeps the answers well-formed
REFERENCE_COPIES = 16  # SFT answers per option per question: every option equally often
REFERENCE_STEPS = 800  # SFT steps fitting the uniform reference
# The answer letters' output rows start 3x their initial scale. LoRA leaves the output layer frozen
# and the final RMSNorm fixes the hidden state's norm, so the log-ratios it can put between answers
# are bounded by these rows; at 1x, reaching the population's ratios pushed the hidden state far
# enough to lift every other token ~5 nats, mass that global tempering then finds.
ANSWER_ROW_SCALE = 3.0
REFERENCE_LR = 1e-2  # its peak learning rate: the format (letter, then </s>) must hold firmly
# AdamW's beta2 forgets the large early gradients within ~20 steps, so the weights keep pushing the
# logits of every token that is not an answer down (their gradients are tiny but consistent): with
# the default 0.999 they stall ~10 nats below the answers, and global tempering finds that mass.
REFERENCE_ADAM_BETAS = [0.9, 0.95]


# ---------------------------------------------------------------------------------------------
# Data: tokenizer, reference answers, preference pairs
# ---------------------------------------------------------------------------------------------


def train_tokenizer(path: Path, questions: list[SurveyQuestion]) -> None:
    """A SentencePiece model with Mistral's special ids (unk 0, bos 1, eos 2, no pad) in which each
    whole prompt of ``questions`` is one piece, and each answer (" A", " B", ...) one more.

    A prompt is then one token after bos: its embedding is that question's row in a table of
    answer distributions, which a small model learns in seconds (module docstring). Nothing is
    downloaded. Other text encodes poorly: mostly unknown pieces.
    """
    import sentencepiece as spm

    from spl.tokenizer import load_tokenizer

    letters = sorted({letter for q in questions for letter in q.letters()})
    lines = [q.prompt() for q in questions] + [answer_text(letter) for letter in letters] * 8
    common = dict(model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
                  character_coverage=1.0, split_by_whitespace=True, num_threads=1, minloglevel=2)
    # A user-defined symbol must equal the normalized text SentencePiece matches it against ("▁"
    # for spaces, newlines as spaces, NFKC): take it from a plain model's own pieces.
    plain = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=plain, vocab_size=200,
                                   **common)
    sp = spm.SentencePieceProcessor(model_proto=plain.getvalue())
    symbols = sorted({"".join(sp.encode(q.prompt(), out_type=str)) for q in questions})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=200 + len(symbols), user_defined_symbols=symbols, **common)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    tok = load_tokenizer(path)
    bad = [q.id for q in questions if len(tok.encode(q.prompt())) != 1]
    bad += [letter for letter in letters if len(tok.encode(answer_text(letter))) != 1]
    if bad:
        raise RuntimeError(f"tokenizer {path}: {bad[:5]} are not single pieces")


def train_demo_tokenizer(path: Path) -> None:
    """The default demo's tokenizer (``train_tokenizer`` over ``demo_questions()``): a small real
    SentencePiece model that tests use too."""
    train_tokenizer(path, demo_questions())


def reference_records(questions: list[SurveyQuestion], copies: int, seed: int) -> list[dict]:
    """SFT records: every option of every question ``copies`` times (a uniform reference policy)."""
    records = [{"prompt": q.prompt(), "response": answer_text(letter)}
               for q in questions for letter in q.letters() for _ in range(copies)]
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[k] for k in perm]


def preference_pairs(questions: list[SurveyQuestion], tok, comparisons: int, seed: int, *,
                     non_answer_comparisons: int | None = None, by_share: bool = True):
    """The population's pairwise preferences as a ``PreferenceDataset`` of one-token answers.

    Each pair of options (i, j) of a question is compared ``comparisons`` times; round(comparisons
    * p_i / (p_i + p_j)) of them prefer i (Bradley-Terry with reward log p). Options that both have
    share 0 are not compared.

    Non-answers. A letter that answers other questions of the set but is not an option here, and
    "</s>" (an empty answer: a refusal, which the survey rules drop), are zero-share options: every
    option beats them ``comparisons`` times. Every other token of the vocabulary loses to every
    option ``non_answer_comparisons`` times. With ``by_share`` (the demo) those counts are scaled by
    k p_i for option i of k (the mean stays the same; a zero-share option gets none): see below.
    Nobody answers with those (p_best = 0), so by Prop. A.1 the optimum gives them 0 and leaves
    the options' proportions as they were. Without them the loss sees nothing but the options, and
    training lets probability leak out of the answers, where a sampler then finds it.

    Format. Each option followed by "</s>" also beats the same option followed by any other token,
    ``non_answer_comparisons`` times each: the answer's end is part of its format, and without
    these pairs nothing in this stage holds it (a pair's answers are letters alone, below).

    Pairs are built from token ids directly: the answers are one letter each, without the "</s>"
    that ``PreferenceDataset.from_records`` would append (module docstring), and ids are shared
    lists, so 10^5-10^6 pairs stay small.
    """
    from spl.data import PreferenceDataset, PreferencePair

    if non_answer_comparisons is None:
        non_answer_comparisons = NON_ANSWER_COMPARISONS
    single = [[t] for t in range(tok.vocab_size)]  # one shared list per one-token response
    letter_ids = {letter: tok.encode(answer_text(letter))[0] for q in questions for letter in q.letters()}
    pairs = []
    for q in questions:
        prompt = tok.encode(q.prompt(), bos=True)
        answers = [single[letter_ids[letter]] for letter in q.letters()]
        p = q.population
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                if p[i] + p[j] == 0:
                    continue
                wins = round(comparisons * p[i] / (p[i] + p[j]))
                pairs += [PreferencePair(prompt, answers[i], answers[j])] * wins
                pairs += [PreferencePair(prompt, answers[j], answers[i])] * (comparisons - wins)
        own = {a[0] for a in answers}
        # Zero-share options: other questions' letters, and "</s>" (an empty answer is a refusal,
        # which the survey rules drop).
        elsewhere = (set(letter_ids.values()) | {tok.eos_id}) - own
        for i, answer in enumerate(answers):
            # In proportion to the option's share: a person's answer (drawn from p) against one that
            # nobody gives. The loss keeps pushing every non-answer down (its optimum is -inf), and
            # each such pair's gradient on log pi(answer) is ~ pi(non-answer) / pi(answer): equal
            # counts would lift the rare options most and flatten the answers (measured: TV 0.05-0.07
            # to theory on two questions); counts ~ p_i make that push the same for every option.
            share = len(p) * p[i] if by_share else 1.0
            for t in range(tok.vocab_size):
                if t in own:
                    continue
                count = round(share * (comparisons if t in elsewhere else non_answer_comparisons))
                pairs += [PreferencePair(prompt, answer, single[t])] * count
            done = answer + [tok.eos_id]  # the format: "</s>" ends the answer
            pairs += [PreferencePair(prompt, done, answer + [t])
                      for t in range(tok.vocab_size) if t != tok.eos_id] * non_answer_comparisons
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    stats = {"read": len(pairs), "kept": len(pairs)}
    return PreferenceDataset([pairs[k] for k in perm], stats, tok.pad_id)


# ---------------------------------------------------------------------------------------------
# The printout
# ---------------------------------------------------------------------------------------------


def report(questions: list[SurveyQuestion], ref_dists, trained_dists, alpha: float,
           beta: float) -> tuple[str, list[dict]]:
    """A table per question and the numbers behind it (also written as JSON)."""
    kind = "DPO (alpha == beta)" if alpha == beta else f"SPL alpha={alpha:g} beta={beta:g}"
    lines = [f"Opinion demo: {kind}; global temperature alpha/beta = {alpha / beta:g}",
             f"Pooling rule: {POOLING_RULE}.", f"Missing answers: {MISSING_RULE}."]
    rows = []
    for q, ref, got in zip(questions, ref_dists, trained_dists, strict=True):
        pop = torch.tensor(q.population, dtype=torch.float64)
        dpo, spl = theory(ref, pop, beta, beta), theory(ref, pop, alpha, beta)
        tv = total_variation(got, spl)
        groups = list(q.groups) if q.pooled else []
        who = f"{q.population_name} ({', '.join(q.groups)})" if q.pooled else q.population_name
        lines += ["", f"{q.id}: {shorten(q.text, 150)}", f"  population: {who}"]
        head = f"  {'option':<30}" + "".join(f"{shorten(g, 10):>11}" for g in groups)
        lines.append(head + f"{'population':>11}{'reference':>10}{'DPO theory':>11}{'SPL theory':>11}"
                     f"{'trained':>8}")
        for i, option in enumerate(q.options):
            cells = "".join(f"{q.groups[g][i]:>11.3f}" for g in groups)
            lines.append(f"  {shorten(f'{q.letters()[i]}. {option}', 30):<30}{cells}{pop[i].item():>11.3f}"
                         f"{ref[i].item():>10.3f}{dpo[i].item():>11.4f}{spl[i].item():>11.3f}{got[i].item():>8.3f}")
        lines.append(f"  total variation(trained, SPL theory) = {tv:.3f}")
        erased = {}
        for name, dist in (("DPO theory", dpo), ("trained model", got)):
            erased[name] = erased_groups(q, dist)
            if q.pooled:  # whose view a distribution drops: less than half its share in the pool
                said = ", ".join(f"{c} (top answer {q.letters()[k]} gets {dist[k].item():.3f}, pooled share "
                                 f"{share:.3f})" for c, k, share in erased[name])
                lines.append(f"  {name} erases: {said or 'no country'}")
        rows.append({"id": q.id, "question": q.text, "options": q.options,
                     "population_name": q.population_name, "groups": q.groups, "population": q.population,
                     "reference": ref.tolist(),
                     "dpo_theory": dpo.tolist(), "spl_theory": spl.tolist(), "trained": got.tolist(),
                     "tv_to_theory": tv, "erased_by_dpo_theory": [c for c, *_ in erased["DPO theory"]],
                     "erased_by_trained": [c for c, *_ in erased["trained model"]]})
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------------------------
# Training: the two stages, for the demo and the sweep alike
# ---------------------------------------------------------------------------------------------


def demo_model_config(vocab_size: int, preset: str = "tiny") -> ModelConfig:
    """The demo model: a preset's shape (``model.preset``) over the demo tokenizer's vocabulary."""
    return replace(ModelConfig.preset(preset), vocab_size=vocab_size, max_seq_len=256)


def fit_reference(cfg: Config, env, questions: list[SurveyQuestion], ref_dir: Path, model_cfg_for,
                  *, steps: int, copies: int, batch_size: int = 64, lr: float = REFERENCE_LR,
                  answer_row_scale: float = 1.0) -> None:
    """Stage 1 (rank 0 only): tokenizer + a model fitted to answer uniformly, saved in ``ref_dir``.

    Full fine-tuning from random weights; ``model_cfg_for(vocab_size)`` gives the shape. The other
    ranks wait at the caller's barrier: the result is identical on every launch, and a toy model
    needs no sharding.
    """
    from spl.data import SFTDataset
    from spl.model import Transformer
    from spl.saving import save_model
    from spl.tokenizer import load_tokenizer
    from spl.trainer import DistEnv, Trainer, print0

    work = ref_dir.parent / (ref_dir.name + "_run")
    tok_path = work / "tokenizer.model"
    train_tokenizer(tok_path, questions)
    tok = load_tokenizer(tok_path, "none")
    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg_for(tok.vocab_size)).to(env.device)
    if answer_row_scale != 1.0:  # see ANSWER_ROW_SCALE
        letters = sorted({letter for q in questions for letter in q.letters()})
        with torch.no_grad():
            model.lm_head.weight[[tok.encode(answer_text(x))[0] for x in letters]] *= answer_row_scale
    data_kw = dict(max_len=cfg.data.max_len, max_prompt_len=cfg.data.max_prompt_len)
    sft = SFTDataset.from_records(reference_records(questions, copies, cfg.train.seed), tok, **data_kw)
    batch_size = min(batch_size, len(sft))  # a small question set is one batch
    sft_cfg = replace(cfg, lora=replace(cfg.lora, enabled=False),
                      train=replace(cfg.train, mode="sft", lr=lr, adam_betas=list(REFERENCE_ADAM_BETAS),
                                    max_steps=steps, warmup_steps=10,
                                    batch_size=batch_size, micro_batch_size=batch_size, min_lr_ratio=0.01,
                                    out_dir=str(work), resume=False, overwrite=True, ref_cache=None,
                                    eval_every=10**9, save_every=10**9, report_to=[]))
    print0(env, f"stage 1/2: fitting the reference policy ({len(sft)} answers, uniform over each "
                f"question's options, {steps} steps)")
    Trainer(sft_cfg, DistEnv(device=env.device), model, sft, tokenizer_path=str(tok_path)).train()
    save_model(model, model.cfg, ref_dir, overwrite=True)
    (ref_dir / "tokenizer.model").write_bytes(tok_path.read_bytes())
    # The config that fitted it says how it reads prompts (chat template "none") to sample.py and
    # evaluate.py, which are pointed at this directory too (base model, difficulty source).
    (ref_dir / "config.yaml").write_text(sft_cfg.to_yaml())


def run_demo(cfg: Config, env) -> dict:
    """Fit the reference (or reuse it), train SPL on the population's preferences, print the table."""
    from spl.checkpoint import load_model
    from spl.lora import apply_lora
    from spl.tokenizer import load_tokenizer
    from spl.trainer import Trainer, TrainingError, print0

    if cfg.train.divergence != "reverse_kl":  # the table compares with SPL's theory, not f-DPO's
        raise TrainingError(f"the embedded demo trains SPL/DPO only; train.divergence={cfg.train.divergence} "
                            "(f-DPO) needs data.train_path")
    # The demo's prompts are plain text; saved so that sample.py and evaluate.py pose them the same way.
    if cfg.data.chat_template not in ("auto", "none"):
        raise TrainingError("the embedded demo trains on plain text: data.chat_template must be auto or "
                            f"none, got {cfg.data.chat_template!r}")
    cfg.data.chat_template = "none"
    out = Path(cfg.train.out_dir)
    ref_dir = out / "reference"
    questions = demo_questions()
    if not (ref_dir / "config.json").is_file() and env.is_main:
        fit_reference(cfg, env, questions, ref_dir, lambda v: demo_model_config(v, cfg.model.preset),
                      steps=REFERENCE_STEPS, copies=REFERENCE_COPIES, answer_row_scale=ANSWER_ROW_SCALE)
    _barrier(env)
    tok_path = ref_dir / "tokenizer.model"
    tok = load_tokenizer(tok_path, "none")
    model, _ = load_model(ref_dir, device=env.device)
    ref_dists = answer_distributions(model, tok, questions)
    # Stage 2: SPL with LoRA; the reference is the same weights with adapters disabled.
    torch.manual_seed(cfg.train.seed)
    apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               targets=tuple(cfg.lora.targets))
    pairs = preference_pairs(questions, tok, COMPARISONS, cfg.train.seed + 1)
    t = cfg.train
    print0(env, f"stage 2/2: {'DPO' if t.alpha == t.beta else 'SPL'} alpha={t.alpha:g} beta={t.beta:g} "
                f"on {len(pairs)} preference pairs drawn from the population")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_questions(out / QUESTIONS_FILE, questions)
    # Reference log-probs once for all pairs (the same weights with adapters disabled), not per step.
    cache = cfg.train.ref_cache or str(out / "reference_logps.safetensors")
    cfg = replace(cfg, train=replace(cfg.train, ref_cache=cache))
    trainer = Trainer(cfg, env, model, pairs, tokenizer_path=str(tok_path), base_path=str(ref_dir.resolve()))
    trainer.train()
    trained = answer_distributions(model, tok, questions)
    text, rows = report(questions, ref_dists, trained, t.alpha, t.beta)
    if env.is_main:
        mass = well_formed_mass(model, tok, questions)
        for row, m in zip(rows, mass, strict=True):
            row["well_formed"] = m
        print(text)
        print(f"\nwell-formed answers (one option letter, then </s>): {min(mass):.4f}-{max(mass):.4f} of "
              "the probability, per question")
        (out / "demo_results.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"checkpoint: {trainer.latest_checkpoint()}  (python sample.py --global-temp 2 "
              "--num-samples 16 uses it)")
    return {"rows": rows}


def _barrier(env) -> None:
    if env.world_size > 1:
        torch.distributed.barrier()
