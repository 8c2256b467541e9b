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
import math
from dataclasses import replace
from pathlib import Path

import torch

from spl.config import Config, ModelConfig
from spl.survey import (
    ALL_COUNTRIES_FILE,
    MISSING_RULE,
    POOLING_RULE,
    US_FILE,
    SurveyQuestion,
    load_questions,
)

# The demo's questions, all with three options (A-C): no letter is an answer to one question and not
# to another, so none leaks in from elsewhere. (id in the US file) or (id, countries pooled).
US_QUESTIONS = ["goqa-2265", "goqa-11553", "goqa-20172", "goqa-8935"]
POOLED_QUESTIONS = [("goqa-0", ("Belgium", "Greece", "Spain")),  # Germany's influence in the EU
                    ("goqa-6002", ("Kuwait", "Lebanon", "Tunisia"))]  # who chooses a woman's husband
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
QUESTIONS_FILE = "questions.jsonl"  # beside a run's checkpoints: what it trained on


def demo_questions() -> list[SurveyQuestion]:
    """The six questions of the default demo, in print order."""
    pooled = [load_questions(ALL_COUNTRIES_FILE, ids=[qid], countries=list(countries))[0]
              for qid, countries in POOLED_QUESTIONS]
    return load_questions(US_FILE, ids=US_QUESTIONS) + pooled


# ---------------------------------------------------------------------------------------------
# Data: tokenizer, reference answers, preference pairs
# ---------------------------------------------------------------------------------------------


def answer_text(letter: str) -> str:
    """An answer as the model writes it after "Answer:" (the data path appends "</s>")."""
    return f" {letter}"


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
                     non_answer_comparisons: int | None = None):
    """The population's pairwise preferences as a ``PreferenceDataset`` of one-token answers.

    Each pair of options (i, j) of a question is compared ``comparisons`` times; round(comparisons
    * p_i / (p_i + p_j)) of them prefer i (Bradley-Terry with reward log p). Options that both have
    share 0 are not compared.

    Non-answers. A letter that answers other questions of the set but is not an option here, and
    "</s>" (an empty answer: a refusal, which the survey rules drop), are zero-share options: every
    option beats them ``comparisons`` times. Every other token of the vocabulary loses to every
    option ``non_answer_comparisons`` times. Nobody answers with those (p_best = 0), so by Prop. A.1 the
    optimum gives them 0 and leaves the options' proportions as they were. Without them the loss
    sees nothing but the options, and training lets probability leak out of the answers, where a
    sampler then finds it.

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
        for answer in answers:
            for t in range(tok.vocab_size):
                if t in own:
                    continue
                count = comparisons if t in elsewhere else non_answer_comparisons
                pairs += [PreferencePair(prompt, answer, single[t])] * count
            done = answer + [tok.eos_id]  # the format: "</s>" ends the answer
            pairs += [PreferencePair(prompt, done, answer + [t])
                      for t in range(tok.vocab_size) if t != tok.eos_id] * non_answer_comparisons
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    stats = {"read": len(pairs), "kept": len(pairs)}
    return PreferenceDataset([pairs[k] for k in perm], stats, tok.pad_id)


# ---------------------------------------------------------------------------------------------
# Measuring a model: answer distributions, well-formedness, theory
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def letter_logprobs(model, tok, questions: list[SurveyQuestion], batch_size: int = 64) -> list[torch.Tensor]:
    """Per question, log pi(letter | prompt) of each option letter (K,) float64, over the full vocabulary.

    One forward per batch of right-padded prompts (causal attention: padding after a prompt cannot
    change it); the next-token log-softmax at each prompt's last position, in fp32.
    """
    model.eval()
    device = model.lm_head.weight.device
    prompts = [tok.encode(q.prompt(), bos=True) for q in questions]
    letters = [[tok.encode(answer_text(letter))[0] for letter in q.letters()] for q in questions]
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        T = max(map(len, chunk))
        ids = torch.tensor([p + [tok.pad_id] * (T - len(p)) for p in chunk], device=device)  # (B, T)
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)  # (B,)
        h = model(ids, return_hidden=True)[torch.arange(len(chunk), device=device), last]  # (B, D)
        logp = model.lm_head(h).float().log_softmax(dim=-1).cpu()  # (B, V)
        out += [logp[r, letters[s + r]].double() for r in range(len(chunk))]
    return out


def answer_distributions(model, tok, questions: list[SurveyQuestion], *,
                         adapters: bool = True) -> list[torch.Tensor]:
    """Per question, the model's distribution over its answers (option letters renormalized).

    ``adapters=False`` reads a LoRA model's reference (the same weights with adapters disabled).
    """
    from contextlib import nullcontext

    from spl.lora import disable_adapters, lora_modules

    ctx = disable_adapters(model) if (not adapters and lora_modules(model)) else nullcontext()
    with ctx:
        return [torch.softmax(lp, dim=0) for lp in letter_logprobs(model, tok, questions)]


@torch.no_grad()
def answer_logprobs(model, tok, question: SurveyQuestion) -> torch.Tensor:
    """log pi(" <letter></s>" | prompt) of each whole well-formed answer (K,) float64."""
    from spl.logprobs import sequence_logps

    model.eval()
    device = model.lm_head.weight.device
    prompt = tok.encode(question.prompt(), bos=True)
    seqs = [prompt + tok.encode(answer_text(letter)) + [tok.eos_id] for letter in question.letters()]
    ids = torch.tensor(seqs, device=device)  # (K, T): every answer is one letter and eos
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (K, T); the last column is never read
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(prompt) - 1:len(prompt) + 1] = True  # the letter and the eos
    h = model(ids, return_hidden=True)  # (K, T, D)
    return sequence_logps(h, model.lm_head.weight, targets, mask, impl="plain").double().cpu()


def well_formed_mass(model, tok, questions: list[SurveyQuestion]) -> list[float]:
    """Per question, the probability that a sampled answer is one option letter followed by "</s>"."""
    return [answer_logprobs(model, tok, q).exp().sum().item() for q in questions]


def answer_tally(model, tok, question: SurveyQuestion, completions: list[list[int]],
                 temperature: float, log_z: float | None = None) -> str:
    """Sampled answers counted beside the exact global-temperature distribution over the answers.

    ``completions`` are the sampled token ids (eos included). The exact target among well-formed
    answers is pi_T(a) ∝ pi(" a</s>")^(1/T) (eqs. 7-10 restricted to them; the line under the
    table says how much of the untempered mass they hold). A completion that is not one option
    letter followed by "</s>" counts as malformed. ``log_z``, the sampler's estimate of
    log sum_y pi(y)^(1/T) over every sequence, gives the share of pi^(1/T) that is malformed:
    tempering raises a small leak p to p^(1/T), so it is larger there than in pi.
    """
    logp = answer_logprobs(model, tok, question)  # (K,) whole answers, letter and eos
    exact = torch.softmax(logp / temperature, dim=0)  # (K,)
    plain = torch.softmax(logp, dim=0)  # (K,) the same at T = 1, for contrast
    letter_ids = [tok.encode(answer_text(letter))[0] for letter in question.letters()]
    counts = [0] * len(letter_ids)
    malformed = 0
    for ids in completions:
        if len(ids) == 2 and ids[1] == tok.eos_id and ids[0] in letter_ids:
            counts[letter_ids.index(ids[0])] += 1
        else:
            malformed += 1
    n = max(1, len(completions))
    lines = [f"answers to {question.id} ({len(completions)} samples at global temperature {temperature:g}):",
             f"  {'answer':<34}{'samples':>8}{'share':>7}{f'exact T={temperature:g}':>12}{'exact T=1':>11}"]
    for k, option in enumerate(question.options):
        label = _short(f"{question.letters()[k]}. {option}", 34)
        lines.append(f"  {label:<34}{counts[k]:>8}{counts[k] / n:>7.2f}{exact[k].item():>12.3f}"
                     f"{plain[k].item():>11.3f}")
    lines.append(f"  {'malformed':<34}{malformed:>8}{malformed / n:>7.2f}")
    lines.append(f"  (well-formed answers hold {logp.exp().sum().item():.4f} of the model's untempered mass")
    if log_z is not None:  # sum over well-formed answers of pi^(1/T), against the estimated total
        held = math.exp(torch.logsumexp(logp / temperature, dim=0).item() - log_z)
        lines[-1] += (f" and ~{min(held, 1.0):.3f} of pi^(1/{temperature:g}), by the sampler's estimate "
                      "of its total")
    lines[-1] += ")"
    return "\n".join(lines)


def theory(ref: torch.Tensor, pop: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """SPL's optimal policy over the options (Prop. A.1): ref^(beta/alpha) * p_best^(1/alpha).

    alpha == beta is DPO's pi ∝ ref * p^(1/beta) (Prop. 3.1). A zero share has log -inf: the
    option gets exactly 0.
    """
    logits = (beta / alpha) * ref.log() + pop.log() / alpha
    return torch.softmax(logits, dim=0)


def erased_groups(question: SurveyQuestion, dist: torch.Tensor) -> list[tuple[str, int, float]]:
    """Countries of a pooled question whose top answer gets less than half its pooled share.

    Each is (country, option index, pooled share of that option): the share of the pooled
    respondents whose view ``dist`` drops. Single-country questions have no groups to erase.
    """
    if not question.pooled:
        return []
    out = []
    for country, shares in question.groups.items():
        top = max(range(len(shares)), key=shares.__getitem__)
        if dist[top].item() < 0.5 * question.population[top]:
            out.append((country, top, question.population[top]))
    return out


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


# ---------------------------------------------------------------------------------------------
# The printout
# ---------------------------------------------------------------------------------------------


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


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
        lines += ["", f"{q.id}: {_short(q.text, 150)}", f"  population: {who}"]
        head = f"  {'option':<30}" + "".join(f"{_short(g, 10):>11}" for g in groups)
        lines.append(head + f"{'population':>11}{'reference':>10}{'DPO theory':>11}{'SPL theory':>11}"
                     f"{'trained':>8}")
        for i, option in enumerate(q.options):
            cells = "".join(f"{q.groups[g][i]:>11.3f}" for g in groups)
            lines.append(f"  {_short(f'{q.letters()[i]}. {option}', 30):<30}{cells}{pop[i].item():>11.3f}"
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


def write_questions(path: Path, questions: list[SurveyQuestion]) -> None:
    """The run's questions in the all-countries file format, the trained population as one more
    group (``SurveyQuestion.record``): ``read_questions_file`` and ``evaluate.py`` read it."""
    path.write_text("".join(json.dumps(q.record(), ensure_ascii=False) + "\n" for q in questions),
                    encoding="utf-8")


def read_questions_file(path: Path) -> list[SurveyQuestion]:
    """The questions a run wrote with ``write_questions`` (each trained population restored)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        name = r["population_name"]
        groups = {c: s for c, s in r["distributions"].items() if c != name}
        out.append(SurveyQuestion(f"goqa-{r['min_id']}", r["question_text"], r["options"], name,
                                  r["distributions"][name], groups or {name: r["distributions"][name]}))
    return out


def run_questions(source: str | Path) -> list[SurveyQuestion] | None:
    """The questions an opinion run trained on, found from its run, step or reference directory."""
    source = Path(source)
    for folder in (source, source.parent, source.parent.parent):
        if (folder / QUESTIONS_FILE).is_file():
            return read_questions_file(folder / QUESTIONS_FILE)
    return None


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
