"""The embedded demo's questions, how a model's answers to them are read, and SPL's theory for them.

What both training (``spl/demo.py``, ``experiments/opinions.py``) and evaluation
(``evaluate.py --suite demo``, ``sample.py`` on the demo run) need, with no training code: the six
GlobalOpinionQA questions (``spl/survey.py`` says how they are read), a run's own questions file,
a model's exact distribution over the option letters, the tally of sampled answers beside the
exact global-temperature distribution, and Prop. A.1's optimum ref^(beta/alpha) p_best^(1/alpha).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from spl.survey import ALL_COUNTRIES_FILE, US_FILE, SurveyQuestion, load_questions

# The demo's questions, all with three options (A-C): no letter is an answer to one question and not
# to another, so none leaks in from elsewhere. (id in the US file) or (id, countries pooled).
US_QUESTIONS = ["goqa-2265", "goqa-11553", "goqa-20172", "goqa-8935"]


POOLED_QUESTIONS = [("goqa-0", ("Belgium", "Greece", "Spain")),  # Germany's influence in the EU
                    ("goqa-6002", ("Kuwait", "Lebanon", "Tunisia"))]  # who chooses a woman's husband


QUESTIONS_FILE = "questions.jsonl"  # beside a run's checkpoints: what it trained on


def demo_questions() -> list[SurveyQuestion]:
    """The six questions of the default demo, in print order."""
    pooled = [load_questions(ALL_COUNTRIES_FILE, ids=[qid], countries=list(countries))[0]
              for qid, countries in POOLED_QUESTIONS]
    return load_questions(US_FILE, ids=US_QUESTIONS) + pooled


def answer_text(letter: str) -> str:
    """An answer as the model writes it after "Answer:" (the data path appends "</s>")."""
    return f" {letter}"


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
        label = shorten(f"{question.letters()[k]}. {option}", 34)
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


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


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
