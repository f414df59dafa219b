"""A trained adapter is what is served: the engine with it, peft + transformers with it, the
training model itself and the merged HF directory give the same logits (float32)."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as T

from pagedlm import LLM, LoRARequest, SamplingParams
from pagedlm.config import ModelConfig
from pagedlm.model.layers.attention import CausalMetadata
from pagedlm.model.registry import load_model
from pagedlm.train.data import Example, make_rows
from pagedlm.train.export import hf_config_for, save_hf
from pagedlm.train.loop import TrainConfig, Trainer
from pagedlm.train.lora import add_lora, merge_lora, save_adapter
from pagedlm.train.model import make_trainable
from tests.helpers import save_tiny
from tests.test_lora import record_logits

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 61, 12, 200, 31, 77, 14, 150, 9, 18, 300]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-adapter")
    base = save_tiny("llama", str(root / "base"))
    cfg = ModelConfig.from_pretrained(base)
    model = make_trainable(load_model(base, cfg, torch.float32))
    torch.manual_seed(0)
    add_lora(model, r=8, alpha=16, targets="q_proj,v_proj,o_proj,gate_proj,down_proj")
    g = torch.Generator().manual_seed(1)
    exs = [Example(torch.randint(0, 300, (12,), generator=g).tolist(), [True] * 12) for _ in range(8)]
    tc = TrainConfig(out_dir=str(root / "run"), steps=4, batch_size=2, seq_len=32, lr=5e-2, warmup_steps=0,
                     progress=False)
    Trainer(model, tc, make_rows(exs, 32, pack=True)).fit()
    save_adapter(model, str(root / "adapter"), base)
    return base, str(root / "adapter"), model


def _ours_training_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        model.eval()
        h = model(torch.tensor(ids), torch.arange(len(ids)), CausalMetadata(1, len(ids)))
        return model.compute_logits(h)


def test_engine_peft_and_training_model_agree(trained):
    base, adapter, model = trained
    llm = LLM(base, dtype="float32", enable_lora=True, max_lora_rank=8, num_kv_blocks=64, block_size=4,
              quantization="none")
    seen = record_logits(llm.engine)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=0)  # all logits
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False,
                       lora_request=LoRARequest("trained", 1, adapter))[0]
    full = PROMPT + out.outputs[0].token_ids
    served = torch.cat(seen)
    hf_base = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        plain = hf_base(torch.tensor([full])).logits[0, :-1].clone()
        ref = peft.PeftModel.from_pretrained(hf_base, adapter).eval()(torch.tensor([full])).logits[0, :-1]
    assert (ref - plain).abs().max() > 0.05  # training moved the adapter away from the identity
    torch.testing.assert_close(served, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_ours_training_logits(model, full)[:-1], ref, rtol=1e-4, atol=1e-4)


def test_merged_directory_equals_peft(trained, tmp_path):
    base, adapter, _ = trained
    cfg = ModelConfig.from_pretrained(base)
    model = make_trainable(load_model(base, cfg, torch.float32))
    add_lora(model, r=8, alpha=16, targets="q_proj,v_proj,o_proj,gate_proj,down_proj")
    from safetensors.torch import load_file

    # the saved adapter back into a fresh training model, then merged and written as an HF dir
    state = load_file(f"{adapter}/adapter_model.safetensors")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "A") and hasattr(mod, "parts"):
                parent = name.rpartition(".")[0].rpartition(".")[0]
                for hf in mod.parts:
                    mod.A[hf].copy_(state[f"base_model.model.{parent}.{hf}.lora_A.weight"])
                    mod.B[hf].copy_(state[f"base_model.model.{parent}.{hf}.lora_B.weight"])
    merge_lora(model)
    save_hf(model, str(tmp_path), hf_config_for(base, base))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        merged = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)(ids).logits
        hf_base = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        ref = peft.PeftModel.from_pretrained(hf_base, adapter).eval()(ids).logits
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,up_proj"])
def test_lora_gradients_equal_peft(tmp_path, targets):
    """The fused LoRA GEMMs (all projections of q/k/v or gate/up at once, zero rows where a
    projection is not targeted) give peft's loss and adapter gradients, on packed rows."""
    from pagedlm.train.data import collate
    from pagedlm.train.lora import lora_state
    from pagedlm.train.model import IGNORE, loss_sum

    base = save_tiny("llama", str(tmp_path / "base"), with_tokenizer=False)
    cfg = ModelConfig.from_pretrained(base)
    model = make_trainable(load_model(base, cfg, torch.float32))
    torch.manual_seed(0)
    names = add_lora(model, r=4, alpha=8, targets=targets)
    with torch.no_grad():  # B != 0, so A's gradient is not zero either
        for n, p in model.named_parameters():
            if ".B." in n:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(2)
    exs = [Example(torch.randint(0, 300, (n,), generator=g).tolist(), [False] * 3 + [True] * (n - 3))
           for n in (9, 6, 11, 7)]
    batch = collate(make_rows(exs, 24, pack=True), pack=True, pad_to=24)
    ours = loss_sum(model, batch)
    ours.backward()
    hf = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=names))
    params = dict(pm.named_parameters())
    ours_state = lora_state(model)
    with torch.no_grad():
        for k, v in ours_state.items():
            params[k.replace(".weight", ".default.weight")].copy_(v)
    logits = pm(input_ids=batch.input_ids, position_ids=batch.positions, use_cache=False).logits
    sel = batch.labels != IGNORE
    theirs = torch.nn.functional.cross_entropy(logits[sel], batch.labels[sel], reduction="sum")
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours_grads = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "parts") and hasattr(mod, "A"):
            parent = name.rpartition(".")[0].rpartition(".")[0]
            for hf_name in mod.parts:
                ours_grads[f"base_model.model.{parent}.{hf_name}.lora_A.default.weight"] = mod.A[hf_name].grad
                ours_grads[f"base_model.model.{parent}.{hf_name}.lora_B.default.weight"] = mod.B[hf_name].grad
    assert len(ours_grads) == len(ours_state) > 0
    for k, grad in ours_grads.items():
        torch.testing.assert_close(grad, params[k].grad, rtol=1e-4, atol=1e-6, msg=k)
