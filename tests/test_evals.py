"""evals/: the batched scorer against one-at-a-time brute force, a model that knows the answers,
GSM8K answer extraction, the hub-shaped data path, malformed data, run_all's output files."""

import json
import math

import pytest
import torch

from nanochat.checkpoint import save_model_checkpoint
from nanochat.common import resolve_data_dir
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import get_tokenizer

from evals import arc, common, gsm8k, hellaswag, run_all
from evals.common import MCItem, evaluate_mc, mean_and_stderr, read_jsonl_records, tokenize_mc_items


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared 2-core machine they spin-wait
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir():
    try:
        return resolve_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"bundled data not found: {e}")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("char")


def random_model(tok, mhc=False, seq_len=2048):
    """A tiny untrained model whose outputs depend on every weight (zero-init projections filled in)."""
    cfg = GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=seq_len, n_embd=64, n_head=2,
                               mhc_enabled=mhc)
    model = build_model(cfg, "cpu", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05, generator=g)
            block.mlp.c_proj.weight.normal_(0, 0.05, generator=g)
        model.lm_head.weight.normal_(0, 0.3, generator=g)
    return model.eval()


# ----------------------------------------------------------------------------- brute force


def brute_force_choice_logprobs(model, tok, item: MCItem) -> list[float]:
    """One item, one choice, one full forward at a time, no cache: the definition of the score."""
    context = tok.encode(item.context)
    out = []
    for choice in item.choices:
        continuation = tok.encode(item.context + " " + choice)[len(context):]
        seq = [tok.bos_id] + context + continuation
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq]))[0].double(), dim=-1)
        start = 1 + len(context)  # position of the first continuation token
        out.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(continuation)))
    return out


def real_items(task, data_dir, n):
    if task == "hellaswag":
        return hellaswag.load_items(data_dir)[:n]
    return arc.load_items(task, "test", data_dir)[:n]


@pytest.mark.parametrize("task,mhc", [("hellaswag", False), ("arc_easy", False), ("arc_challenge", True)])
def test_batched_scorer_agrees_with_brute_force(task, mhc, tok, data_dir):
    model = random_model(tok, mhc=mhc)
    items = real_items(task, data_dir, 6)
    # batch_size 4 and a small budget: several batches, left-padded contexts, right-padded choices
    res = evaluate_mc(model, tok, task, items, "cpu", batch_size=4, token_budget=4000)
    assert res.n == len(items) and res.n_truncated == 0
    for item, rec in zip(items, res.records):
        ref = brute_force_choice_logprobs(model, tok, item)
        assert rec["logprobs"] == pytest.approx(ref, abs=1e-3)
        ref_pred = max(range(len(ref)), key=lambda j: ref[j])
        ref_norm = max(range(len(ref)), key=lambda j: ref[j] / len(item.choices[j]))
        assert (rec["pred"], rec["pred_norm"]) == (ref_pred, ref_norm)
        assert rec["correct"] == (ref_pred == item.gold)
    acc = sum(r["correct"] for r in res.records) / len(items)
    assert res.metrics["acc"]["value"] == pytest.approx(acc)


def brute_force_greedy(model, tok, prompt_ids, max_new_tokens):
    """Greedy decoding by full recompute, one token at a time, stopping like the eval does."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
        if "Question:" in tok.decode(ids[len(prompt_ids):]):
            break
    return gsm8k.cut_at_stop(tok.decode(ids[len(prompt_ids):]))


def test_gsm8k_batched_generation_agrees_with_brute_force(tok, data_dir):
    model = random_model(tok, seq_len=512)
    res = gsm8k.evaluate(model, tok, "cpu", shots=0, limit=4, batch_size=3, data_dir=data_dir, max_new_tokens=12)
    records = gsm8k.load_records("test", data_dir)[:4]
    for r, rec in zip(records, res.records):
        prompt = tok.encode(gsm8k.build_prompt(r["question"]), prepend_bos=True)
        assert rec["completion"] == brute_force_greedy(model, tok, prompt, 12)
        assert rec["target"] == r["target"]


# ----------------------------------------------------------------------------- a model that knows


KNOWN_TEXTS = [
    "Sky: The sky is blue today.",
    "Question: What do bees make?\nAnswer: honey",
    "Question: Which planet is red?\nAnswer: Mars",
    "Question: Tom has 2 apples and buys 3 more. How many apples does he have?\nAnswer: 2+3=5 apples.\n#### 5",
]


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny model trained for 60 steps on KNOWN_TEXTS (BOS first, EOS last, as documents are)."""
    cfg = GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=128, n_embd=64, n_head=2)
    model = build_model(cfg, "cpu", seed=0)
    seqs = [tok.encode(t, prepend_bos=True) + [tok.eos_id] for t in KNOWN_TEXTS]
    T = max(map(len, seqs)) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1], y[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(60):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    return model.eval()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_known_data(root):
    """Hand-made items in the bundled files' formats, whose answers the trained model memorised."""
    write_jsonl(root / "hellaswag" / "hellaswag_val.jsonl", [
        {"idx": 0, "activity_label": "Sky", "ctx": "The sky is", "label": 2, "split": "val",
         "endings": ["green grass.", "made of cheese.", "blue today.", "loud."]}])
    arc_rows = [
        {"id": "bees", "question": {"stem": "What do bees make?", "choices": [
            {"text": t, "label": l} for t, l in zip(["milk", "honey", "silk", "wax"], "ABCD")]}, "answerKey": "B"},
        {"id": "mars", "question": {"stem": "Which planet is red?", "choices": [
            {"text": t, "label": l} for t, l in zip(["Venus", "Earth", "Mars"], "123")]}, "answerKey": "3"}]
    for subset in ("ARC-Easy", "ARC-Challenge"):
        write_jsonl(root / "arc" / subset / f"{subset}-Test.jsonl", arc_rows)
    problem = {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
               "answer": "2+3=5 apples.\n#### 5"}
    write_jsonl(root / "gsm8k" / "test.jsonl", [problem])
    write_jsonl(root / "gsm8k" / "train.jsonl", [problem])
    return root


def test_scorer_picks_the_answer_a_trained_model_knows(trained, tok, tmp_path):
    root = make_known_data(tmp_path)
    res = hellaswag.evaluate(trained, tok, "cpu", data_dir=root)
    assert res.records[0]["pred"] == 2 and res.metrics["acc"]["value"] == 1.0
    assert res.metrics["acc_norm"]["value"] == 1.0
    for task in ("arc_easy", "arc_challenge"):
        res = arc.evaluate(trained, tok, "cpu", task=task, data_dir=root)
        assert [r["pred"] for r in res.records] == [1, 2]  # labels A-D and 1-3 both map to indices
        assert res.metrics["acc"]["value"] == 1.0


def test_gsm8k_generates_and_grades_the_known_answer(trained, tok, tmp_path):
    root = make_known_data(tmp_path)
    res = gsm8k.evaluate(trained, tok, "cpu", shots=0, data_dir=root, max_new_tokens=40)
    rec = res.records[0]
    assert "#### 5" in rec["completion"] and rec["strict"] == "5"
    assert rec["strict_correct"] and rec["flexible_correct"]
    assert res.metrics["exact_match_strict"]["value"] == 1.0
    assert rec["finish_reason"] == "stop"  # the trained model ends with EOS


# ----------------------------------------------------------------------------- GSM8K grading


@pytest.mark.parametrize("text,strict,flexible", [
    ("so the total is 1,234.\n#### 1,234", "1,234", "1,234"),
    ("It drops by -5", None, "-5"),
    ("Each costs 3.50", None, "3.50"),
    ("She pays $12", None, "$12"),
    ("The answer is 7.", None, "7."),
    ("3 apples and 4 pears make 7 fruits, and 10 minus 7 is 3", None, "3"),
    ("no digits at all", None, None),
    ("#### 42\nQuestion", "42", "42"),
])
def test_answer_extraction_on_tricky_strings(text, strict, flexible):
    assert gsm8k.extract_strict_answer(text) == strict
    assert gsm8k.extract_flexible_answer(text) == flexible


@pytest.mark.parametrize("completion,target,strict_ok,flexible_ok", [
    ("#### 1,234", "1234", True, True),
    ("It is -5", "-5", False, True),
    ("$12", "12", False, True),
    ("The answer is 7.", "7", False, True),
    ("#### 18.", "18", True, True),
    ("#### 3.50", "3.5", False, False),  # an exact string match, as in the harness: 3.50 != 3.5
    ("#### 4 then 9", "4", True, False),  # strict takes the first "####", flexible the last number
    ("nothing", "1", False, False),
])
def test_grade_completion_normalises_both_sides(completion, target, strict_ok, flexible_ok):
    g = gsm8k.grade_completion(completion, target)
    assert (g["strict_correct"], g["flexible_correct"]) == (strict_ok, flexible_ok)


def test_reference_answer_and_fewshot_prompt(data_dir):
    assert gsm8k.reference_answer("a\nb <<4*3=12>>12\n#### 1,200") == "1200"
    train = gsm8k.load_records("train", data_dir)
    prefix = gsm8k.fewshot_prefix(train, 8)
    assert prefix.count("Question: ") == 8 and prefix.count("#### ") == 8 and prefix.endswith("\n\n")
    assert prefix.startswith("Question: " + train[0]["question"] + "\nAnswer: " + train[0]["answer"] + "\n\n")
    prompt = gsm8k.build_prompt("Q?", prefix)
    assert prompt.endswith("\n\nQuestion: Q?\nAnswer:")


# ----------------------------------------------------------------------------- data paths


def test_hub_shaped_files_map_to_the_same_records(tmp_path, data_dir):
    pytest.importorskip("datasets")
    import pandas as pd

    cache = tmp_path / "hf_cache"
    # ARC: the hub's shape (question a string; choices a dict of lists), from the first local rows
    local = arc.load_items("arc_challenge", "test", data_dir)[:5]
    raw = [json.loads(line) for line in open(data_dir / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl")][:5]
    hub_rows = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in raw]
    pd.DataFrame(hub_rows).to_parquet(tmp_path / "arc.parquet")
    hub = arc.load_items("arc_challenge", "test", hf_data_files=tmp_path / "arc.parquet", cache_dir=cache)
    assert [(i.id, i.context, i.choices, i.gold) for i in hub] == [(i.id, i.context, i.choices, i.gold) for i in local]

    # HellaSwag: ctx_a + capitalised ctx_b, then the harness's cleaning of WikiHow brackets
    write_jsonl(tmp_path / "hs.jsonl", [
        {"ind": 4, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "then the man",
         "ctx": "unused", "endings": ["fries it. ", "eats  the shell."], "label": "1", "split": "val",
         "split_type": "indomain", "source_id": "x"},
        {"ind": 5, "activity_label": "Home", "ctx_a": "[header] How to paint [title] Buy paint.", "ctx_b": "",
         "ctx": "unused", "endings": ["[step] Open it.", "Drink it."], "label": "0", "split": "val",
         "split_type": "zeroshot", "source_id": "y"}])
    items = hellaswag.load_items(hf_data_files=tmp_path / "hs.jsonl", cache_dir=cache)
    assert items[0].context == "Cooking: A man cracks an egg. Then the man"
    assert items[0].choices == ["fries it.", "eats the shell."] and items[0].gold == 1 and items[0].id == "4"
    assert items[1].context == "Home: How to paint. Buy paint."
    assert items[1].choices == [" Open it.", "Drink it."]  # the harness strips before removing tags

    # GSM8K: same keys as the bundled file; parquet works as well as json
    rows = [json.loads(line) for line in open(data_dir / "gsm8k/test.jsonl")][:3]
    pd.DataFrame(rows).to_parquet(tmp_path / "gsm.parquet")
    hub = gsm8k.load_records("test", hf_data_files=tmp_path / "gsm.parquet", cache_dir=cache)
    assert [r["target"] for r in hub] == [r["target"] for r in gsm8k.load_records("test", data_dir)[:3]]


def test_malformed_line_names_file_and_line(tmp_path):
    good = {"idx": 0, "activity_label": "A", "ctx": "b", "endings": ["c", "d"], "label": 0}
    path = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{\"idx\": 2, \"ctx\n")
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl:3: malformed JSON"):
        hellaswag.load_items(tmp_path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 7}) + "\n")
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl:2: .*gold index 7"):
        hellaswag.load_items(tmp_path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "ctx"}) + "\n")
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl:1: missing field 'ctx'"):
        hellaswag.load_items(tmp_path)
    arc_path = tmp_path / "bad_arc.jsonl"
    arc_path.write_text(json.dumps({"id": "q", "question": {"stem": "s", "choices": [{"text": "x", "label": "A"}]},
                                    "answerKey": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"bad_arc\.jsonl:1: answerKey 'E'"):
        read_jsonl_records(arc_path, arc.item_from_local_row)
    gsm_path = tmp_path / "gsm.jsonl"
    gsm_path.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm\.jsonl:1: solution has no '#### N'"):
        read_jsonl_records(gsm_path, gsm8k.record_from_row)


# ----------------------------------------------------------------------------- batching details


def test_truncation_cuts_context_from_the_left_and_keeps_bos(tok):
    item = MCItem("long", "x" * 50 + "END", ["abc", "abcdefgh"], 0)
    [t] = tokenize_mc_items(tok, [item], max_len=20)
    assert t.truncated and t.context_ids[0] == tok.bos_id
    assert len(t.context_ids) + max(len(c) for c in t.choice_ids) == 20
    assert tok.decode(t.context_ids[1:]).endswith("END")  # the end of the context survives
    model = random_model(tok, seq_len=20)
    res = evaluate_mc(model, tok, "t", [item, MCItem("short", "hi", ["a", "b"], 1)], "cpu")
    assert res.n_truncated == 1 and [r["truncated"] for r in res.records] == [True, False]


def test_batches_cover_every_item_once_within_limits(tok):
    items = [MCItem(str(i), "c" * (5 + 7 * i % 40), ["a" * (1 + i % 3), "bb"], 0) for i in range(30)]
    tokenized = tokenize_mc_items(tok, items, 512)
    groups = common.mc_batches(tokenized, batch_size=4, token_budget=200)
    assert sorted(i for g in groups for i in g) == list(range(30))
    for g in groups:
        longest = max(len(tokenized[i].context_ids) + max(map(len, tokenized[i].choice_ids)) for i in g)
        assert len(g) <= 4 and (len(g) == 1 or 2 * len(g) * longest <= 200)


def test_fewshot_items_are_excluded_and_prefixed(data_dir):
    items = hellaswag.load_items(data_dir)[:30]
    scored, shot_ids = hellaswag.apply_shots(items, 3)
    assert len(scored) == 27 and not set(shot_ids) & {it.id for it in scored}
    first_shot = next(it for it in items if it.id == shot_ids[0])
    assert scored[0].context.startswith(first_shot.context + " " + first_shot.choices[first_shot.gold] + "\n\n")
    assert scored[0].context.count("\n\n") == 3
    prefix, ids = arc.shot_prefix(arc.load_items("arc_easy", "train", data_dir), 2)
    assert len(ids) == 2 and prefix.count("Question: ") == 2 and prefix.endswith("\n\n")


def test_stderr_is_the_harness_sample_stderr():
    v = mean_and_stderr([1, 0, 0, 1, 1])
    assert v["value"] == pytest.approx(0.6)
    assert v["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    assert mean_and_stderr([1])["stderr"] is None


def test_bad_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="unknown"):
        run_all.parse_tasks("hellaswag,mmlu", run_all.ALL_TASKS)
    with pytest.raises(ValueError, match="TASK=K"):
        run_all.parse_shots(["gsm8k:8"], ["gsm8k"])
    assert run_all.parse_shots(["gsm8k=8", "hellaswag=0,5"], ["gsm8k", "hellaswag"]) == {"gsm8k": [8], "hellaswag": [0, 5]}


# ----------------------------------------------------------------------------- run_all end to end


def test_run_all_writes_json_markdown_and_per_item_files(tok, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE_DIR", str(tmp_path / "cache"))  # bpb's token shards
    ckpt = save_model_checkpoint(tmp_path / "run" / "final.pt", random_model(tok, mhc=True, seq_len=256), tok,
                                 {"step": 12, "args": {"data": "tinyshakespeare"}})
    out = tmp_path / "evals"
    payload, out_dir = run_all.main([
        "--ckpt", str(ckpt.parent), "--limit", "3", "--bpb_tokens", "2048", "--bpb_batch_size", "2",
        "--max_new_tokens", "6", "--shots", "gsm8k=0,2", "--device", "cpu", "--out_dir", str(out),
        "--data_dir", str(data_dir), "--mhc_gate", "0.5"])
    assert out_dir == out
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["checkpoint"] == str(ckpt) and saved["step"] == 12 and saved["config"]["mhc_enabled"]
    assert saved["date"] and saved["commit"] and saved["tokenizer"] == "char"
    names = ["bpb", "hellaswag_0shot", "arc_easy_0shot", "arc_challenge_0shot", "gsm8k_0shot", "gsm8k_2shot"]
    assert list(saved["tasks"]) == names
    assert saved["tasks"]["bpb"]["corpus"] == "tinyshakespeare" and saved["tasks"]["bpb"]["metrics"]["bpb"]["value"] > 0
    for name in names[1:]:
        t = saved["tasks"][name]
        assert t["n"] == 3 and all(0 <= m["value"] <= 1 and m["stderr"] is not None for m in t["metrics"].values())
        assert t["speed"]["ms_per_token"] > 0 and t["speed"]["peak_memory_mb"] > 0
        lines = [json.loads(x) for x in (out / t["predictions"]).read_text().splitlines()]
        assert len(lines) == 3 and all("truncated" in x and "source" in x for x in lines)
    assert {"pred", "pred_norm", "gold", "logprobs"} <= set(json.loads((out / "arc_easy_0shot.jsonl").read_text().splitlines()[0]))
    assert {"completion", "strict", "flexible", "target"} <= set(json.loads((out / "gsm8k_2shot.jsonl").read_text().splitlines()[0]))
    md = (out / "results.md").read_text()
    assert "| task | metric | value | n | stderr |" in md and "| hellaswag_0shot | acc_norm |" in md
    assert "ms/token" in md and f"commit: {saved['commit']}" in md
    with pytest.raises(FileExistsError):  # results are never overwritten
        run_all.main(["--ckpt", str(ckpt), "--tasks", "arc_easy", "--out_dir", str(out), "--data_dir", str(data_dir)])


# ----------------------------------------------------------------------------- distributed


def _rank_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    tok = get_tokenizer("char")
    model = random_model(tok, seq_len=512)
    items = arc.load_items("arc_easy", "test")[:7]
    res = evaluate_mc(model, tok, "arc_easy", items, "cpu", batch_size=2)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"n": res.n, "acc": res.metrics["acc"], "ids": [r["id"] for r in res.records],
                       "tokens": res.speed["tokens"]}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_over_two_ranks_equals_one_process(tok, tmp_path, data_dir, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_dir))  # inherited by the spawned ranks
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.json")), nprocs=2)
    dist_res = json.loads((tmp_path / "out.json").read_text())
    items = arc.load_items("arc_easy", "test", data_dir)[:7]
    single = evaluate_mc(random_model(tok, seq_len=512), tok, "arc_easy", items, "cpu")
    assert dist_res["n"] == 7 and sorted(dist_res["ids"]) == sorted(it.id for it in items)
    assert dist_res["acc"]["value"] == pytest.approx(single.metrics["acc"]["value"])
    assert dist_res["tokens"] == single.speed["tokens"]
