"""Training: the params.yaml recipe forced small (tiny model, a few steps, CPU)."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest_stages import load_stage
from vqatune.config import ConfigError, load_params, section
from vqatune.training.checkpoints import PARTIAL_MARKER, last_complete_checkpoint
from vqatune.training.config import TrainConfig, apply_overrides, load_hyperparameters
from vqatune.training.run import TrainingInterrupted, run_training, split_train_eval

REPO = Path(__file__).resolve().parents[1]
SMALL = {"max_steps": 4, "batch_size": 4, "eval_batch_size": 8, "gradient_accumulation_steps": 1,
         "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "max_eval_rows": 8, "warmup": 0.0,
         "early_stopping_patience": 0}


def small_config(**overrides) -> TrainConfig:
    """The real `train:` section of params.yaml, forced small."""
    cfg = section(load_params(REPO / "params.yaml"), "train", TrainConfig)
    return apply_overrides(cfg, {**SMALL, **overrides})


class Snapshots(TrainerCallback):
    def __init__(self, stop_at: int | None = None):
        self.before, self.after, self.trainable, self.model_ref, self.stop_at = {}, {}, set(), None, stop_at

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.model_ref = weakref.ref(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.stop_at is not None and state.global_step == self.stop_at:
            raise KeyboardInterrupt  # what Ctrl-C (or the stage's SIGTERM handler) raises

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_every_trainable_parameter_changes_and_no_frozen_one_does(tiny_model_dir, processed_dir, tmp_path):
    snap = Snapshots()
    cfg = small_config(load_best_model_at_end=False, learning_rate=1e-2)
    result = run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "adapter",
                          checkpoint_dir=tmp_path / "ckpt", callbacks=[snap])
    assert snap.trainable, "nothing was trainable"
    unchanged = [n for n in snap.trainable if torch.equal(snap.before[n], snap.after[n])]
    assert unchanged == []
    changed_frozen = [n for n in snap.before if n not in snap.trainable
                      and not torch.equal(snap.before[n], snap.after[n])]
    assert changed_frozen == []
    assert result.steps == 4 and result.trainable_params == sum(snap.before[n].numel() for n in snap.trainable)
    assert result.quantization == cfg.quantization and result.device.startswith("cpu") and not result.resumed
    # run_training freed its model: nothing keeps it alive.
    assert snap.model_ref() is None
    saved = Path(tmp_path / "adapter")
    assert (saved / "adapter_model.safetensors").exists() and (saved / "adapter_config.json").exists()
    assert (saved / "tokenizer.model").exists() or (saved / "tokenizer.json").exists()
    assert not (saved / PARTIAL_MARKER).exists()
    # The saved adapter really adapts: peft starts every lora_B at zero (a no-op adapter), and
    # each one the run trained must have left zero in the file.
    tensors = adapter_tensors(saved)
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b and [k for k, v in lora_b.items() if not v.abs().sum() > 0] == []


def test_prompt_mode_mix_trains_every_mode_deterministically(tiny_model_dir, processed_dir):
    """prompt_mode mix: each row's mode is drawn from its row_id and the seed, the same on every
    call; all three modes occur, and the collator reads each row's own messages column."""
    from collections import Counter

    from datasets import load_from_disk

    from vqatune.training.collate import AnswerOnlyCollator, mixed_prompt_mode

    train = load_from_disk(str(processed_dir))["train"]
    rows = train.select_columns(["row_id", "img_id", "question"]).to_list()
    modes = [mixed_prompt_mode(r, seed=0) for r in rows]
    assert modes == [mixed_prompt_mode(r, seed=0) for r in rows]
    assert modes != [mixed_prompt_mode(r, seed=1) for r in rows]
    counts = Counter(modes)
    assert set(counts) == {"none", "static", "adaptive"} and min(counts.values()) > len(rows) / 5
    from vqatune.models.loading import load_processor

    processor = load_processor(tiny_model_dir)
    mixed = AnswerOnlyCollator(processor, "mix", mix_seed=0)
    picked = [train[modes.index(mode)] for mode in ("none", "static", "adaptive")]
    batch = mixed(picked)
    for i, mode in enumerate(("none", "static", "adaptive")):
        single = AnswerOnlyCollator(processor, mode)([picked[i]])
        n = int(single["attention_mask"].sum())
        assert torch.equal(batch["input_ids"][i, :n], single["input_ids"][0, :n]), mode
    assert small_config(prompt_mode="mix").prompt_mode == "mix"


def test_loss_falls_on_a_fixed_batch(tiny_model_dir, processed_dir):
    from datasets import load_from_disk

    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.models.loading import free_model, load_base_model, load_processor
    from vqatune.models.lora import attach_lora
    from vqatune.models.precision import prepare_for_kbit_training

    cfg = small_config()
    torch.manual_seed(0)
    processor = load_processor(tiny_model_dir)
    model = load_base_model(tiny_model_dir, quantization=cfg.quantization, compute_dtype="float32", device="cpu")
    model = attach_lora(prepare_for_kbit_training(model, False), cfg.lora)
    rows = [load_from_disk(str(processed_dir))["train"][i] for i in range(8)]
    batch = AnswerOnlyCollator(processor, cfg.prompt_mode)(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    model.train()
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    free_model(model)


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(tiny_model_dir, processed_dir, tmp_path):
    cfg = small_config(max_steps=5, save_total_limit=5)
    whole = run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "whole", checkpoint_dir=tmp_path / "c1")

    with pytest.raises(TrainingInterrupted) as stop:
        run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "killed", checkpoint_dir=tmp_path / "c2",
                     callbacks=[Snapshots(stop_at=3)])
    assert stop.value.result.partial and stop.value.result.steps == 3
    assert (tmp_path / "killed" / PARTIAL_MARKER).exists()
    assert (tmp_path / "killed" / "adapter_model.safetensors").exists()

    resumed = run_training(cfg, tiny_model_dir, processed_dir, tmp_path / "resumed", checkpoint_dir=tmp_path / "c2")
    assert resumed.resumed and resumed.resumed_from_step == 2 and resumed.steps == whole.steps == 5
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.eval_loss == pytest.approx(whole.eval_loss, abs=1e-5)
    # A changed param never resumes another run's checkpoints.
    other = run_training(small_config(max_steps=5, save_total_limit=5, seed=1), tiny_model_dir, processed_dir,
                         None, checkpoint_dir=tmp_path / "c2")
    assert not other.resumed


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    from safetensors.torch import save_file

    for step, complete in ((2, True), (4, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file({"w": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
        torch.save({"state": {}}, ckpt / "optimizer.pt")
        torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
        if complete:  # written last: its absence means the save did not finish
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_eval_slice_holds_out_whole_train_images(processed_dir):
    from datasets import load_from_disk

    train = load_from_disk(str(processed_dir))["train"]
    fit, held = split_train_eval(train, 0.2, seed=0)
    assert len(fit) + len(held) == len(train)
    assert not set(fit["img_id"]) & set(held["img_id"])
    assert set(held["row_id"]) <= set(train["row_id"])
    _, capped = split_train_eval(train, 0.2, seed=0, max_eval_rows=5)
    assert len(capped) == 5


def test_config_validation_names_the_key():
    assert isinstance(section(load_params(REPO / "params.yaml"), "train", TrainConfig), TrainConfig)
    cases = {
        "train.quantization": {"quantization": "2bit"},
        "train.lr_scheduler": {"lr_scheduler": "sawtooth"},
        "train.optimizer": {"optimizer": "adamw"},
        "train.eval_fraction": {"eval_fraction": 0.0},
        "train.save_steps": {"save_steps": 3, "eval_steps": 2, "load_best_model_at_end": True},
        "train.early_stopping_patience": {"early_stopping_patience": 2, "load_best_model_at_end": False},
        "train.lora.alpha": {"lora.alpha": 0},
        "train.lora.typo": {"lora.typo": 1},
        "train.epoch": {"epoch": 3},
    }
    for key, override in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            apply_overrides(TrainConfig(), override)


def test_hyperparameters_come_from_search_only_when_it_searched(tmp_path):
    path = tmp_path / "best_params.json"
    assert load_hyperparameters(path) == ({}, "params.yaml")
    path.write_text(json.dumps({"searched": False, "params": {"learning_rate": 1.0}}))
    assert load_hyperparameters(path) == ({}, "params.yaml")
    path.write_text(json.dumps({"searched": True, "params": {"learning_rate": 5e-4, "lora.r": 8,
                                                            "gradient_accumulation_steps": 2}}))
    overrides, source = load_hyperparameters(path)
    assert source.startswith("search")
    cfg = apply_overrides(TrainConfig(), overrides)
    assert (cfg.learning_rate, cfg.lora.r, cfg.gradient_accumulation_steps) == (5e-4, 8, 2)


def test_stage_writes_adapter_card_metrics_and_curves(tiny_model_dir, processed_dir, tmp_path, stages_train):
    import yaml

    params = load_params(REPO / "params.yaml")
    params["train"] = {**(params.get("train") or {}), "max_steps": 2, "batch_size": 4, "eval_steps": 1,
                       "save_steps": 1, "logging_steps": 1, "max_eval_rows": 4, "early_stopping_patience": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "best.json").write_text(json.dumps({"searched": True, "params": {"learning_rate": 1e-3}}))
    out = tmp_path / "models" / "adapter"
    argv = ["--model", str(tiny_model_dir), "--data", str(processed_dir), "--best-params", str(tmp_path / "best.json"),
            "--out", str(out), "--metrics", str(tmp_path / "train.json"), "--plots", str(tmp_path / "curves"),
            "--checkpoints", str(tmp_path / "ckpt"), "--params", str(tmp_path / "params.yaml")]
    assert stages_train.main(argv) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    card = (out / "README.md").read_text()
    assert "base_model: " + params["model"]["id"] in card and "learning_rate" in card and "peft" in card
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["hyperparameter_source"].startswith("search") and metrics["steps"] == 2
    assert metrics["eval_loss_start"] is not None and metrics["resumed"] is False
    for key in ("train_loss", "eval_loss", "examples_per_s", "peak_memory_gib", "trainable_params",
                "device", "quantization", "epochs"):
        assert key in metrics
    curves = tmp_path / "curves" / "plots" / "metrics"
    for name in ("train/loss.tsv", "eval/loss.tsv", "train/learning_rate.tsv"):
        lines = (curves / name).read_text().splitlines()
        assert lines[0].startswith("step") and len(lines) >= 2
    assert not Path(f"{out}.tmp").exists()

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**params, "train": {"lora": {"r": -1}}}))
    assert stages_train.main(argv[:-1] + [str(tmp_path / "bad.yaml")]) == 2


@pytest.fixture
def stages_train(monkeypatch):
    import sys

    module = load_stage("train")
    monkeypatch.setitem(sys.modules, "stages_train", module)
    return module


@pytest.mark.slow
def test_ctrl_c_on_the_stage_leaves_a_partial_adapter_and_the_rerun_resumes(tiny_model_dir, processed_dir,
                                                                           tmp_path):
    """The real thing: SIGINT to `python stages/train.py`, then the stage run again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    params = load_params(REPO / "params.yaml")
    params["train"] = {**(params.get("train") or {}), "max_steps": 40, "batch_size": 2, "eval_steps": 2,
                       "save_steps": 2, "logging_steps": 1, "max_eval_rows": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, ckpt = tmp_path / "adapter", tmp_path / "ckpt"
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), "--model", str(tiny_model_dir), "--data",
           str(processed_dir), "--best-params", str(tmp_path / "none.json"), "--out", str(out), "--metrics",
           str(tmp_path / "train.json"), "--plots", str(tmp_path / "curves"), "--checkpoints", str(ckpt),
           "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(ckpt.glob("*/checkpoint-4/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert (Path(f"{out}.partial") / PARTIAL_MARKER).exists() and not out.exists()
    assert "PARTIAL" in (Path(f"{out}.partial") / "README.md").read_text()

    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed"] and metrics["resumed_from_step"] >= 4 and metrics["steps"] == 40
    assert not Path(f"{out}.partial").exists() and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("precompute, projector", [(True, False), (False, False), (True, True)])
def test_precomputed_image_features_leave_no_vision_forward_to_the_steps(tiny_model_dir, processed_dir, tmp_path,
                                                                          monkeypatch, precompute, projector):
    """Precomputed features: no step runs the vision tower. With a projector that trains (the
    tiny model's), the tower's outputs are what is cached, and the projector still learns."""
    from datasets import load_from_disk

    from vqatune.vision.feature_cache import ImageFeatureCache

    caches = []
    install = ImageFeatureCache.install

    def spy(self, *args, **kwargs):
        caches.append(self)
        return install(self, *args, **kwargs)

    monkeypatch.setattr(ImageFeatureCache, "install", spy)

    class VisionCalls(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.misses_at_start = caches[0].misses
            self.calls = []
            tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
            self.hook = tower.register_forward_hook(lambda *a: self.calls.append(1))
            self.projector = {n: p.detach().clone() for n, p in model.named_parameters()
                              if "multi_modal_projector" in n and p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.hook.remove()
            self.projector_changed = [n for n, p in model.named_parameters()
                                      if n in self.projector and not torch.equal(p, self.projector[n])]

    calls = VisionCalls()
    cfg = small_config(load_best_model_at_end=False, cache_image_features=True,
                       precompute_image_features=precompute)
    cfg.lora.target_modules, cfg.lora.vision_tower = "mlp", False
    cfg.lora.modules_to_save = ["multi_modal_projector"] if projector else []
    run_training(cfg, tiny_model_dir, processed_dir, None, checkpoint_dir=tmp_path / "ckpt", callbacks=[calls])

    train, held_out = split_train_eval(load_from_disk(str(processed_dir))["train"], cfg.eval_fraction, cfg.seed,
                                       cfg.max_eval_rows)
    distinct = len(set(train["img_id"])) + len(set(held_out["img_id"]))
    assert len(caches) == 1
    assert caches[0].level == ("tower" if projector else "projected")
    if projector:
        assert calls.projector and sorted(calls.projector_changed) == sorted(calls.projector)
    if precompute:
        assert calls.misses_at_start == len(caches[0].store) == distinct
        assert calls.calls == []  # four steps and two evaluations, all from the cache
        assert caches[0].misses == distinct and caches[0].hits >= 4 * cfg.batch_size
    else:  # the control: the same run computes features inside its steps
        assert calls.misses_at_start == 0 and len(calls.calls) > 0


def test_keyed_precomputed_features_train_like_lazily_cached_ones(tiny_model_dir, processed_dir, tmp_path,
                                                                  monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from vqatune.vision.feature_cache import ImageFeatureCache
    from vqatune.training.collate import AnswerOnlyCollator

    # The tiny model's projector starts at zero, so every image's features would be 0 and any
    # features would match: a random projector makes the losses depend on which features arrive.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mm_input_projection_weight"))
    weights[name] = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0)).to(weights[name].dtype)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    seen: list[set] = []
    features = ImageFeatureCache.features

    def spy(self, pixel_values, compute):
        seen[-1].add(pixel_values.dtype)
        return features(self, pixel_values, compute)

    monkeypatch.setattr(ImageFeatureCache, "features", spy)
    images_read = []  # by keyed batches: they need no image, so their rows carry none
    collate = AnswerOnlyCollator.__call__

    def collate_spy(self, rows):
        if self.image_keys:
            images_read.extend(row["image"] for row in rows if "image" in row)
        return collate(self, rows)

    monkeypatch.setattr(AnswerOnlyCollator, "__call__", collate_spy)
    losses = {}
    for precompute in (True, False):
        seen.append(set())
        cfg = small_config(load_best_model_at_end=False, cache_image_features=True,
                           precompute_image_features=precompute)
        cfg.lora.target_modules, cfg.lora.vision_tower, cfg.lora.modules_to_save = "mlp", False, []
        # Dropout off: precomputing draws a DataLoader seed from torch's RNG, which shifts every
        # later dropout mask (with 0.05 the runs differ by ~5e-4, keyed or not).
        cfg.lora.dropout = 0.0
        result = run_training(cfg, model_dir, processed_dir, None, checkpoint_dir=tmp_path / f"ckpt-{precompute}")
        losses[precompute] = [h["loss"] for h in result.log_history if "loss" in h] + [result.eval_loss]
    # Keyed batches during the steps with precompute, pixel batches (hashed) without.
    assert seen == [{torch.int64}, {torch.float32}]
    assert images_read == []
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_lean_trainer_computes_trls_loss_and_metrics_without_a_sync_per_micro_batch(tiny_model_dir, processed_dir,
                                                                                     tmp_path):
    """LeanSFTTrainer's loss is TRL's on the same batch; its metrics wait for the log and then
    weigh the micro-batches by their answer tokens (TRL's per-batch ratios, recombined by hand)."""
    from datasets import load_from_disk
    from trl import SFTTrainer

    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.models.loading import free_model, load_base_model, load_processor
    from vqatune.models.lora import attach_lora
    from vqatune.models.precision import prepare_for_kbit_training
    from vqatune.training.trainer import LeanSFTTrainer, build_sft_config

    cfg = small_config(lora={"dropout": 0.0})
    processor = load_processor(tiny_model_dir)
    model = load_base_model(tiny_model_dir, quantization=cfg.quantization, compute_dtype="float32", device="cpu")
    model = attach_lora(prepare_for_kbit_training(model, False), cfg.lora)
    rows = load_from_disk(str(processed_dir))["train"].select(range(8))
    collator = AnswerOnlyCollator(processor, cfg.prompt_mode)
    trainer = LeanSFTTrainer(model=model, args=build_sft_config(cfg, tmp_path, "fp32", False, "cpu"),
                             train_dataset=rows, eval_dataset=rows, data_collator=collator,
                             processing_class=processor)
    trainer.model.train()
    # Two micro-batches with different numbers of answer tokens.
    batches = [collator([rows[i] for i in range(0, 3)]), collator([rows[i] for i in range(3, 8)])]
    answer_tokens = [int((b["labels"][..., 1:] != -100).sum()) for b in batches]
    assert answer_tokens[0] != answer_tokens[1]

    trl = []
    with torch.no_grad():
        for batch in batches:
            loss = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
            trl.append((loss, trainer._metrics["train"]["entropy"][-1],
                        trainer._metrics["train"]["mean_token_accuracy"][-1]))
        tokens_trl = trainer._total_train_tokens
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        lean = [trainer.compute_loss(trainer.model, dict(batch)) for batch in batches]
    for (loss_trl, _, _), loss_lean in zip(trl, lean):
        assert torch.allclose(loss_trl, loss_lean, rtol=1e-5), (loss_trl, loss_lean)
    assert not trainer._metrics["train"]  # nothing is read back before the log
    assert tokens_trl == sum(int(b["attention_mask"].sum()) for b in batches) > 0

    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    weights = [n / sum(answer_tokens) for n in answer_tokens]
    assert logged["entropy"] == pytest.approx(sum(w * e for w, (_, e, _) in zip(weights, trl)), rel=1e-5)
    assert logged["mean_token_accuracy"] == pytest.approx(sum(w * a for w, (_, _, a) in zip(weights, trl)), rel=1e-5)
    assert logged["num_tokens"] == tokens_trl
    # With the Trainer's token count of the whole accumulated batch, as in a training step.
    with torch.no_grad():
        total = torch.tensor(sum(answer_tokens))
        assert torch.allclose(SFTTrainer.compute_loss(trainer, trainer.model, dict(batches[0]), num_items_in_batch=total),
                              trainer.compute_loss(trainer.model, dict(batches[0]), num_items_in_batch=total), rtol=1e-5)
    free_model(trainer, model)


@pytest.mark.slow
def test_compiled_training_does_not_recompile_for_a_new_batch(tiny_model_dir, processed_dir, tmp_path):
    """The precomputed-feature training path with compiled layers (the GPU default) compiles its
    decoder layers in the first steps, then never again, whatever the batch's length: the attention
    mask reaches the compiled layers without a base to guard on (models.compile._mask_without_base).
    ~40 s of compilation on a CPU (where every recompilation happens in the first step)."""
    from torch._dynamo.utils import counters

    compiled_frames = {0: counters["frames"]["ok"]}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            compiled_frames[state.global_step] = counters["frames"]["ok"]

    cfg = small_config(max_steps=20, batch_size=8, compile=True, cache_image_features=True,
                       precompute_image_features=True, eval_steps=1000, save_steps=1000, logging_steps=5,
                       load_best_model_at_end=False,
                       lora={"target_modules": "mlp", "vision_tower": False, "modules_to_save": [], "dropout": 0.0})
    result = run_training(cfg, tiny_model_dir, processed_dir, None, checkpoint_dir=tmp_path / "ckpt",
                          callbacks=[Count()], resume=False)
    assert result.compiled_layers > 0 and result.steps == 20
    # Two graphs of the decoder layer: evaluation (no grad, the evaluation before the first step)
    # and training. Each extra one is a recompilation (with a base-guarded mask: two more, one
    # for a duck-sized length, one for the other layer type's mask layout).
    assert compiled_frames[20] - compiled_frames[0] == 2, compiled_frames


def _run_key_inputs(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    return model, data


def test_run_key_changes_with_the_code_so_another_codes_checkpoint_is_not_resumed(tmp_path, monkeypatch):
    from vqatune.training import checkpoints

    model, data = _run_key_inputs(tmp_path)
    cfg = TrainConfig()
    key = checkpoints.run_key(cfg, model, data, None)
    assert checkpoints.run_key(cfg, model, data, None) == key  # same code, same inputs: resumable
    assert len(checkpoints.code_signature(checkpoints.TRAINING_ENTRY)) == 12
    monkeypatch.setattr(checkpoints, "code_signature", lambda entry: "other")
    assert checkpoints.run_key(cfg, model, data, None) != key


def test_run_key_follows_the_data_and_config_but_not_datasets_cache_files(tmp_path):
    """A shuffle's cache file beside the data must not orphan a killed run's checkpoints; a
    changed config or a resized weights file must."""
    from vqatune.training.checkpoints import run_key

    model, data = _run_key_inputs(tmp_path)
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    (data / "dataset_info.json").write_text('{"fingerprint": "a"}')
    cfg = TrainConfig()
    key = run_key(cfg, model, data, None)
    (data / "cache-0123abcd.arrow").write_bytes(b"indices")
    assert run_key(cfg, model, data, None) == key
    (data / "dataset_info.json").write_text('{"fingerprint": "b"}')
    changed_data = run_key(cfg, model, data, None)
    assert changed_data != key
    (model / "model.safetensors").write_bytes(b"\0" * 101)
    assert run_key(cfg, model, data, None) != changed_data


def test_fused_head_on_cpu_scores_only_answer_positions_with_the_same_result(tiny_model_dir, processed_dir,
                                                                               monkeypatch):
    """score_answer_positions_only_on_cpu: TRL's fused LM head then projects only the labelled
    positions on the CPU (where it scored every one); log-probabilities, loss and gradients equal
    the every-position result, and the head really sees fewer rows."""
    import trl.trainer.utils as trl_utils
    from datasets import load_from_disk
    from trl.trainer.utils import add_fused_lm_head

    from vqatune.models.loading import free_model, load_base_model, load_processor
    from vqatune.training.collate import AnswerOnlyCollator
    from vqatune.training.trainer import score_answer_positions_only_on_cpu

    from trl.kernels.chunked_logprob import _use_triton as trls_own_choice

    # TRL's own choice (an earlier LeanSFTTrainer may have patched it); restored after the test.
    monkeypatch.setattr(trl_utils, "_use_triton", trls_own_choice)
    model = load_base_model(tiny_model_dir, quantization="none", compute_dtype="float32", device="cpu")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    rows = load_from_disk(str(processed_dir))["train"].select(range(6))
    batch = AnswerOnlyCollator(load_processor(tiny_model_dir), "mix")(list(rows))
    seen = []
    original_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(hidden, *args):
        seen.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)

    def step():
        model.zero_grad()
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()
        return out, grad

    every, grad_every = step()
    score_answer_positions_only_on_cpu()
    compact, grad_compact = step()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [batch["input_ids"].numel() - len(batch["input_ids"]), labelled]
    assert torch.allclose(every.loss, compact.loss, rtol=1e-6)
    for field in ("log_probs", "entropy"):
        assert torch.allclose(getattr(every, field), getattr(compact, field), atol=1e-5), field
    assert torch.equal(every.is_top1, compact.is_top1)
    assert torch.allclose(grad_every, grad_compact, atol=1e-6)
    free_model(model)


def test_group_by_prompt_mode_batches_one_mode_and_pads_less(tiny_model_dir, processed_dir, tmp_path,
                                                             monkeypatch):
    """prompt_mode_lengths gives every row its mode's mean training length (the collator's tokens
    less the image tokens every row has), one value per mode; train.group_by_prompt_mode then
    trains batches of one mode, which carry far less padding than shuffled mixed batches."""
    from datasets import load_from_disk

    from vqatune.models.loading import load_processor
    from vqatune.training import collate

    processor = load_processor(tiny_model_dir)
    train = load_from_disk(str(processed_dir))["train"].select(range(24))
    lengths = collate.prompt_mode_lengths(processor, train, "mix", mix_seed=0)
    batch = collate.AnswerOnlyCollator(processor, "mix", mix_seed=0)(list(train))
    # The collator's rows differ from their text tokens only by the expanded image (the same for all).
    modes = [collate.mixed_prompt_mode(row, 0) for row in train]
    texts = [collate.prompt_text(processor, row[f"messages_{m}"]) + collate.answer_text(processor, row[f"messages_{m}"])
             for row, m in zip(train, modes)]
    text_tokens = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    image_expansion = {int(n) - t for n, t in zip(batch["attention_mask"].sum(dim=1), text_tokens)}
    assert len(image_expansion) == 1 and image_expansion.pop() > processor.image_seq_length
    for mode in set(modes):
        own = [n for n, m in zip(text_tokens, modes) if m == mode]
        assert {n for n, m in zip(lengths, modes) if m == mode} == {round(sum(own) / len(own))}, mode
    assert len(set(lengths)) == len(set(modes)) == 3

    seen = {}
    real_call = collate.AnswerOnlyCollator.__call__

    def recording_call(self, rows):
        out = real_call(self, rows)
        if len(rows) == 4:  # training batches (evaluation batches are 8 rows)
            mask = out["attention_mask"]
            seen[grouped]["padding"] += int(mask.numel() - mask.sum())
            seen[grouped]["modes"].append({self.row_mode(r) for r in rows})
        return out

    monkeypatch.setattr(collate.AnswerOnlyCollator, "__call__", recording_call)
    files_before = sorted(Path(processed_dir).rglob("*"))
    for grouped in (False, True):
        seen[grouped] = {"padding": 0, "modes": []}
        # No feature cache: its precompute pass would collate each image's first row as well.
        cfg = small_config(prompt_mode="mix", group_by_prompt_mode=grouped, max_steps=8, eval_steps=8, save_steps=8,
                           cache_image_features=False)
        assert run_training(cfg, tiny_model_dir, processed_dir, None,
                            checkpoint_dir=tmp_path / f"ck{grouped}").steps == 8
    one_mode = sum(len(m) == 1 for m in seen[True]["modes"])
    assert one_mode >= 6 > sum(len(m) == 1 for m in seen[False]["modes"]), seen
    assert seen[True]["padding"] < seen[False]["padding"] / 2, seen
    # Nothing written into the prepared data (a DVC dependency of the later stages).
    assert sorted(Path(processed_dir).rglob("*")) == files_before
