"""Every benchmark script runs in its tiny CPU mode, so none of them rots between GPU runs."""

import argparse
import json
from functools import partial

import pytest
import torch

from bench import analysis_grid, common, inference, packed_step, step_profile, train_step

pytest.importorskip("peft")  # the baselines need the `bench` extra


def test_train_step_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    train_step.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["setup"]: r for r in result["tables"][0]["rows"]}
    assert len(rows) == 7 and all(r["ms_per_step"] > 0 for r in rows.values())
    assert rows["peft LoRA, fp32, padded to 512"]["tokens_per_s"] > 0
    fast, plain = result["curves"]["fast"], result["curves"]["plain"]
    assert fast == plain  # on CPU both are the eager path from the same seed and batches


def test_step_profile_tiny(tmp_path):
    out = tmp_path / "step_profile.json"
    step_profile.main(["--tiny", "--out", str(out)])
    steps, top = json.loads(out.read_text())["tables"][0]["rows"], step_profile.TOP
    qv, qkvo = steps
    assert (qv["targets"], qkvo["targets"]) == ("qv", "qkvo")
    assert all(s["kernel_ms"] > 0 and s["busy"] > 0 for s in steps)
    assert qkvo["kernels"] > qv["kernels"]  # LoRA on k and o adds operators to each layer
    kernels = json.loads(out.read_text())["tables"][1]["rows"]
    for targets in ("qv", "qkvo"):
        us = [k["us"] for k in kernels if k["targets"] == targets]
        assert len(us) == top and us == sorted(us, reverse=True)


def test_step_profile_tiny_pack(tmp_path):
    out = tmp_path / "step_profile_pack.json"
    step_profile.main(["--tiny", "--pack", "3", "--out", str(out)])
    (row,) = json.loads(out.read_text())["tables"][0]["rows"]
    assert row["targets"] == "pack of 3" and row["kernel_ms"] > 0
    us = [k["us"] for k in json.loads(out.read_text())["tables"][1]["rows"]]
    assert len(us) == step_profile.TOP and us == sorted(us, reverse=True)
    kinds = json.loads(out.read_text())["tables"][2]["rows"]  # CPU operators: mostly "other"
    assert sum(k["us"] for k in kinds) / 1e3 == pytest.approx(row["kernel_ms"])
    assert sum(k["share"] for k in kinds) == pytest.approx(1.0)


def test_kernel_categories_from_names():
    kernels = [{"kernel": name, "calls": 1.0, "us": us} for name, us in [
        ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", 3.0), ("nvjet_sm90_tst_320x128", 4.0),
        ("multi_tensor_apply_kernel<AdamW>", 1.0), ("triton_poi_fused_add_7", 2.0)]]
    kinds = {k["category"]: k["us"] for k in step_profile.categories(kernels, "x")}
    assert kinds == {"GEMM": 4.0, "attention": 3.0, "fused (Triton)": 2.0, "optimizer": 1.0}


def test_packed_step_tiny(tmp_path):
    out = tmp_path / "packed_step.json"
    packed_step.main(["--tiny", "--out", str(out)])
    one, two = json.loads(out.read_text())["tables"][0]["rows"]
    assert (one["jobs"], two["jobs"], two["targets_ranks"]) == (1, 2, "qv1 qkvo1")
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in (one, two))
    assert two["ms_per_job_step"] == two["ms_per_step"] / 2 and one["vs_one"] == 1.0
    assert any(n.startswith("Real tokens are ") for n in json.loads(out.read_text())["notes"])
    # the sweep's 10 jobs: 10 packs of one job against 5 of two
    assert two["paper_sweep_min"] / one["paper_sweep_min"] == pytest.approx(
        two["ms_per_step"] / one["ms_per_step"] / 2)


def test_packed_step_tiny_given_jobs_and_rows(tmp_path):
    out = tmp_path / "packed_step.json"
    packed_step.main(["--tiny", "--jobs", "qkvo2,qv1", "--rows", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["tables"][0]["rows"]
    assert (row["jobs"], row["rows"], row["targets_ranks"]) == (2, 3, "qkvo2 qv1")
    assert row["paper_sweep_min"] is None  # 3 rows a job are not the paper's steps
    assert result["command"].endswith("--jobs qkvo2,qv1 --rows 3")
    with pytest.raises(SystemExit):  # argparse's one line: "'qkvo' is not <targets><rank>"
        packed_step.main(["--tiny", "--jobs", "qkvo"])


def test_real_share_counts_padding():
    pad = -1
    batches = [({"input_ids": torch.tensor([[5, 6, 7, pad], [5, pad, pad, pad]])}, 4),
               ({"input_ids": torch.tensor([[5, 6], [7, 8]])}, 4)]
    assert packed_step.real_share(batches) == 8 / 12


def test_label_head_losses_equal_pack_loss():
    # the LM head on the target positions only: the same per-job losses and gradients
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_repro.lora.packed import PackedJob, apply_packed_lora
    from lora_repro.packed_trainer import pack_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97,
                                       n_positions=32, resid_pdrop=0, embd_pdrop=0,
                                       attn_pdrop=0, bos_token_id=0, eos_token_id=0))
    apply_packed_lora(model, [PackedJob("qv", 2, 8.0, 0), PackedJob("qkvo", 4, 8.0, 1)])
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 97, (6, 12))
    labels = ids.clone()
    labels[:, :4], labels[1, 7:], labels[4, 10:] = -100, -100, -100  # prompts, padding

    def run(loss_fn):
        model.zero_grad()
        losses = loss_fn(model, ids, labels, 0.1)
        losses.sum().backward()
        return losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    (full, g_full), (head, g_head) = (run(partial(pack_loss, jobs=2)),
                                      run(packed_step.label_head_loss_fn(2, compiled=False)))
    assert torch.allclose(head, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_head, g_full, strict=True))
    assert packed_step.target_positions(labels).numel() == (labels[:, 1:] != -100).sum()


def test_packed_step_row_in_a_process_of_its_own():
    # what a GPU run does for each K: the same arguments, that K, a fresh interpreter
    args = argparse.Namespace(tiny=True, data_dir="-", tokenizer="-", rows=3, bf16_base=False,
                              bf16_model=False, label_head=True, attention="eager")
    assert packed_step.variant_flags(args) == ["--label-head", "--attention", "eager"]
    row = packed_step.measure_alone(args, 2)
    assert (row["jobs"], row["rows"], row["targets_ranks"], row["label_head"],
            row["attention"]) == (2, 3, "qv1 qkvo1", True, "eager")
    assert row["ms_per_step"] > 0


def test_inference_tiny(tmp_path):
    out = tmp_path / "inference.json"
    inference.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["setup"] for r in result["tables"][0]["rows"]] == [
        "base model", "LoRA qv r=4, unmerged", "LoRA qv r=4, merged"]
    assert result["decode_s"] > 0


def test_analysis_grid_tiny(tmp_path):
    out = tmp_path / "analysis_grid.json"
    seconds = analysis_grid.main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "python -m bench.analysis_grid --tiny"
    assert "4 matrices (2 layers x Wq, Wv), d = 128" in result["notes"][0]
    rows = {r["stage"]: r for r in result["tables"][0]["rows"]}
    assert list(rows) == ["fig3", "fig4", "table7+fig8", "erank", "total"]
    assert all(rows[name]["s"] == s > 0 for name, s in seconds.items())
    assert rows["total"]["s"] == pytest.approx(sum(seconds.values()))


@pytest.mark.slow
def test_sweep_tiny(tmp_path):
    """Two sweep commands (parallel, sequential) with the CPU jobs injected as on GPU 0."""
    from bench import sweep

    out = tmp_path / "sweep.json"
    result = sweep.main(["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "w")])
    assert json.loads(out.read_text())["title"] == result["title"]
    parts, jobs = result["tables"][0]["rows"], result["tables"][1]["rows"]
    assert [(p["part"], p["per_gpu"], p["jobs"]) for p in parts] == [
        ("parallel", 2, 2), ("sequential", 1, 1)]
    assert parts[0]["most_at_once_per_gpu"] <= 2 and parts[1]["most_at_once_per_gpu"] == 1
    assert parts[0]["jobs_per_gpu"] == "0:2" and parts[1]["vs_alone"] == 1.0
    assert sorted(j["job"] for j in jobs) == ["r1-qv-s1", "r1-qv-s1", "r2-qv-s1"]
    assert all(j["warmup_s"] > 0 and j["tokens_per_s"] > 0 for j in jobs)
    assert parts[0]["aggregate_tokens_per_s"] > 0 and parts[0]["wall_10_jobs_s"] > 0


def test_sweep_aggregate_is_tokens_over_the_union_of_training_spans():
    from bench import sweep

    def job(start, warm, end, tokens):
        return {"started_at": start, "warmup_s": warm, "ended_at": end, "train_tokens": tokens}

    # training spans [10, 30] and [20, 40] overlap, [50, 60] stands alone: 40 s busy
    jobs = [job(0, 10, 30, 100), job(5, 15, 40, 200), job(45, 5, 60, 100)]
    assert sweep.aggregate(jobs) == (400 / 40, 40.0)


def test_sweep_projects_a_pack_as_one_process(tmp_path):
    """A pack of 10 jobs is one process: one wave of warm-up, not ten. (The packed sweep
    itself, end to end: tests/test_launcher.py.)"""
    from bench import sweep

    jobs = [{"job": f"j{i}", "gpu": "0", "warmup_s": 100.0, "compile_s": 90.0,
             "peak_gib": 5.0, "tokens_per_s": 1e3, "ms_per_step": 50.0,
             "steady_ms_per_step": 40.0, "train_tokens": 10_000, "tokens_per_step": 500.0,
             "started_at": 0.0, "ended_at": 200.0} for i in range(10)]
    steps = common.PAPER_E2E_STEPS
    packed = sweep.summarize("parallel", "0", 1, jobs, 200.0, 0, n_sweep=10, pack=10)
    alone = sweep.summarize("parallel", "0", 1, jobs, 200.0, 0, n_sweep=10)
    # 100k tokens over the 100 s when any job trained; the paper sweep's 10 x steps x 500
    assert packed["aggregate_tokens_per_s"] == 1e3
    assert packed["projected_paper_min"] == pytest.approx((100 + 10 * steps * 500 / 1e3) / 60)
    assert packed["steady_projected_paper_min"] == pytest.approx((100 + steps * 0.04) / 60)
    assert alone["steady_projected_paper_min"] == pytest.approx(10 * (100 + steps * 0.04) / 60)
    cold = sweep.summarize("cold", "0", 10, jobs, 200.0, 0, n_sweep=10)  # no projection
    assert cold["projected_paper_min"] is cold["steady_projected_paper_min"] is None
    args = sweep.parse(["--tiny", "--pack", "10", "--out", str(tmp_path / "s.json")])
    result = sweep.report(args, [packed], jobs, [], 1.0, 10, "note")
    assert result["title"].endswith("packs of 10") and result["command"].endswith("--pack 10")


def test_all_frozen_to_bf16_keeps_the_adapters_fp32_and_the_model_runs():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_repro.lora.packed import PackedJob, apply_packed_lora
    from lora_repro.packed_trainer import pack_loss

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                       n_positions=16, bos_token_id=0, eos_token_id=0))
    apply_packed_lora(model, [PackedJob("qv", 2, 8.0, 0)])
    packed_step.all_frozen_to_bf16(model)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    ids = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = pack_loss(model, ids, ids, jobs=1)
    losses.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
