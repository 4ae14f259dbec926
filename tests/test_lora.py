"""LoRA (model.lora, tppo/lora.py): adapters on the policy and the critic's backbone, the
frozen base shared, exact resume from adapter checkpoints, merged weights for vLLM and export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from tppo import lora  # noqa: E402
from tppo.config import ConfigError, LoraConfig, load_config  # noqa: E402
from tppo.models import build_tiny, critic_from_policy  # noqa: E402
from tppo.trainer import Trainer, resume_config  # noqa: E402
from trainer_helpers import TINY, deterministic_metrics, make_cfg  # noqa: E402

LORA = ("model.lora.r=4", "model.lora.alpha=8")


def tiny():
    return build_tiny(TINY, seed=0)[0]


def randomise_adapters(model, seed: int = 1) -> None:
    """B starts at 0 (the policy starts as its base); a trained adapter has B != 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def base_weights(module) -> dict:
    """A LoRA-wrapped module's frozen weights under the plain model's names (adapters left out)."""
    return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}


def ids(n: int = 7):
    return torch.randint(3, 20, (2, n), generator=torch.Generator().manual_seed(0))


def test_adapters_start_as_the_base_and_only_they_train():
    base = tiny()
    policy = lora.add_lora(copy.deepcopy(base), LoraConfig(r=4))
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids()).logits, base(input_ids=ids()).logits), "B = 0: the policy is its base"
    linears = [m for m in base.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == TINY.num_hidden_layers * 7, "q k v o gate up down in every layer (the LM head is not one of them)"
    expected = sum(4 * (m.in_features + m.out_features) for m in linears)  # A: r x in, B: out x r
    assert sum(p.numel() for p in lora.trainable_parameters(policy)) == expected
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_named_target_modules_and_a_missing_one():
    policy = lora.add_lora(tiny(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert {n.split(".")[-4] for n, p in policy.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    dotted = lora.add_lora(tiny(), LoraConfig(r=2, target_modules=["self_attn.q_proj"]))  # peft's suffix match
    assert {n.split(".")[-4] for n, p in dotted.named_parameters() if p.requires_grad} == {"q_proj"}
    model = tiny()
    with pytest.raises(ValueError, match="qkv"):
        lora.add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "qkv"]))
    assert not lora.is_lora(model) and not any("lora_" in n for n, _ in model.named_parameters()), "refused before peft wraps it"


def test_the_config_checks_its_fields():
    assert not load_config(None, []).model.lora.enabled
    assert load_config(None, ["model.lora.r=8", "model.lora.target_modules=[q_proj]"]).model.lora.target_modules == ["q_proj"]
    for bad, words in (("model.lora.r=-1", "model.lora.r"), ("model.lora.dropout=1.0", "model.lora.dropout"),
                       ("model.lora.target_modules=[]", "target_modules"), ("model.lora.alpha=0", "model.lora.alpha"),
                       ("model.lora.target_modules=[q_proj, embed_tokens]", "embed_tokens is an embedding")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [bad])


def test_merged_weights_are_the_adapted_model_under_the_base_names_and_leave_it_untouched():
    base = tiny()
    policy = lora.add_lora(copy.deepcopy(base), LoraConfig(r=4))
    randomise_adapters(policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = lora.merged_state_dict(policy)
    assert set(merged) == set(base.state_dict()), "the base model's names: what vLLM's load_weights and from_pretrained read"
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids()).logits, policy(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items()), "never merged in place"
    # W + scale * B A by hand, for one layer
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-7, rtol=0)
    exported = lora.merged_model(copy.deepcopy(policy)).state_dict()
    assert all(torch.equal(exported[k], merged[k]) for k in merged), "export merges the same way"


def test_the_reference_is_the_base_and_leaves_the_policy_gradient_alone():
    base = tiny()
    policy = lora.add_lora(copy.deepcopy(base), LoraConfig(r=4))
    randomise_adapters(policy)
    ref = lora.AdapterDisabled(policy)
    assert list(ref.parameters()) == [], "no second copy of the weights"

    def grads(with_ref: bool):
        policy.zero_grad()
        out = policy(input_ids=ids()).logits
        if with_ref:
            with torch.no_grad():
                assert torch.equal(ref(input_ids=ids()).logits, base(input_ids=ids()).logits)
        out.square().sum().backward()
        return [p.grad.clone() for p in lora.trainable_parameters(policy)]

    plain, between = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, between)), "the adapter is back on for the backward"


def test_the_critic_reads_the_policy_backbone_and_trains_its_head():
    policy = tiny()
    critic = critic_from_policy(policy)
    shared = lora.share_frozen_backbone(critic, policy)
    assert shared == sum(p.numel() for p in policy.model.parameters())
    assert all(c.data_ptr() == p.data_ptr() for c, p in zip(critic.model.parameters(), policy.model.parameters()))
    critic = lora.add_lora(critic, LoraConfig(r=4), critic=True)
    trained = {n for n, p in critic.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"base_model.model.score.modules_to_save.default.weight", "base_model.model.score.modules_to_save.default.bias"}
    assert critic(input_ids=ids()).logits.shape == (2, 7, 1)


def test_a_lora_run_trains_only_adapters_and_resumes_exactly(model_dir, tmp_path):
    shared = (*LORA, "log.checkpoint_every=2", "log.eval_every=2", "algo.kl_coef=0.1")
    common = (*shared, "train.total_steps=4")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Trainer(make_cfg(model_dir, full_dir, *common), full_dir)
    frozen = {k: v.clone() for k, v in lora.merged_state_dict(full.policy).items()}
    assert isinstance(full.ref, lora.AdapterDisabled)
    history = full.train()
    assert history[-1]["policy/kl"] > 0, "the KL to the base (the adapter off) moves once B leaves 0"
    base_now = base_weights(full.policy.get_base_model())
    assert all(torch.equal(base_now[k], frozen[k]) for k in frozen if k in base_now), "the base is frozen"
    assert any(not torch.equal(v, frozen[k]) for k, v in lora.merged_state_dict(full.policy).items()), "the adapters trained"
    step = full_dir / "checkpoints" / "step-000004"
    assert (step / "policy" / "adapter_model.safetensors").is_file() and not (step / "policy" / "model.safetensors").exists()
    assert (step / "critic" / "adapter_model.safetensors").is_file(), "the critic's adapters and head"

    cut = Trainer(make_cfg(model_dir, cut_dir, *shared, "train.total_steps=2"), cut_dir)
    cut.train()
    resumed = Trainer(resume_config(cut_dir, make_cfg(model_dir, cut_dir, *common)), cut_dir, resume=True)
    assert resumed.step_idx == 2 and resumed.engine.carried
    resumed.train()
    assert deterministic_metrics(cut_dir) == deterministic_metrics(full_dir)
    final = lora.merged_state_dict(full.policy)
    assert all(torch.equal(v, final[k]) for k, v in lora.merged_state_dict(resumed.policy).items())


@pytest.mark.parametrize("critic", ["full", "from_path"])
def test_the_other_critics_with_a_lora_policy_resume_exactly(model_dir, tmp_path, critic):
    """lora.critic=false: the critic is trained in full (its own copy of the backbone) and
    checkpointed whole. model.critic_path: the adapters sit on that critic (no backbone to
    share), and a resume rebuilds it from critic_path before loading them."""
    if critic == "full":
        extra = ("model.lora.critic=false",)
    else:
        from tppo.models import load_pretrained

        policy, _ = load_pretrained(model_dir)
        own = critic_from_policy(policy)
        with torch.no_grad():  # a backbone of its own: not the policy's, not what critic_from_policy would build
            for p in own.model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
        own.save_pretrained(tmp_path / "critic", safe_serialization=True)
        extra = (f"model.critic_path={tmp_path / 'critic'}",)
    shared = (*LORA, *extra, "log.checkpoint_every=2", "log.eval_every=2")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = Trainer(make_cfg(model_dir, full_dir, *shared, "train.total_steps=4"), full_dir)
    adapted = any("lora_" in n for n, _ in full.critic.named_parameters())
    assert adapted == (critic == "from_path")
    if critic == "from_path":
        base = base_weights(full.critic.get_base_model().model)
        assert all(torch.equal(base[k], v) for k, v in own.model.state_dict().items()), "the critic's base is critic_path's"
    if critic == "full":
        assert all(p.requires_grad for p in full.critic.parameters()), "lora.critic=false: the critic trains in full"
        assert not any(c.data_ptr() == p.data_ptr() for c in full.critic.parameters() for p in full.policy.parameters())
    before = {k: v.clone() for k, v in full.critic.state_dict().items()}
    full.train()
    assert any(not torch.equal(v, before[k]) for k, v in full.critic.state_dict().items()), "the critic trained"
    saved = full_dir / "checkpoints" / "step-000004" / "critic"
    assert (saved / "adapter_model.safetensors").is_file() == (critic == "from_path")
    assert (saved / "model.safetensors").is_file() == (critic == "full")

    Trainer(make_cfg(model_dir, cut_dir, *shared, "train.total_steps=2"), cut_dir).train()
    resumed = Trainer(resume_config(cut_dir, make_cfg(model_dir, cut_dir, *shared, "train.total_steps=4")), cut_dir, resume=True)
    resumed.train()
    assert deterministic_metrics(cut_dir) == deterministic_metrics(full_dir)
    final = full.critic.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in resumed.critic.state_dict().items()), "the critic resumed exactly"
    if critic == "from_path":  # its frozen base rebuilt from critic_path, not from the policy
        again = base_weights(resumed.critic.get_base_model().model)
        assert all(torch.equal(again[k], v) for k, v in own.model.state_dict().items())


def test_export_writes_a_plain_directory_from_pretrained_loads(model_dir, tmp_path, monkeypatch):
    """From anywhere: the checkpoint names its base (resolved when written), so a relative
    path read from another directory works; `tppo eval` takes the step or its policy/."""
    import json

    from transformers import AutoModelForCausalLM

    from tppo.cli import main
    from tppo.export import BASE_FILE

    run = tmp_path / "run"
    trainer = Trainer(make_cfg(model_dir, run, *LORA, "train.total_steps=2", "log.checkpoint_every=2"), run)
    trainer.train()
    step = run / "checkpoints" / "step-000002"
    assert json.loads((step / "policy" / BASE_FILE).read_text())["repo"] == str(Path(model_dir).resolve())
    out = tmp_path / "exported"
    monkeypatch.chdir(run / "checkpoints")
    assert main(["export", "step-000002", str(out)]) == 0
    assert not (out / "adapter_config.json").exists()
    for model in ("step-000002", "step-000002/policy"):
        assert main(["eval", "--model", model]) == 0, "eval merges a LoRA checkpoint too"
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, trainer.policy(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)


def test_lora_without_peft_is_one_line_and_exit_2_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import importlib.util

    import tppo.trainer
    from tppo.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(tppo.trainer, "load_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model loaded")))
    assert main(["train", "--run-dir", str(tmp_path / "r"), "model.lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tppo[peft]'" in err and err.count("\n") == 1
