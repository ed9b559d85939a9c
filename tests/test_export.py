"""An exported soft prompt, loaded by `peft` as a prompt-tuning adapter, gives the same logits as
our prefix path with that prompt."""
import torch

from spt_fast.training import checkpoint
from spt_fast.training.export import export_peft
from spt_fast.model.spt import SPTConfig, SPTModel
from spt_fast.testing import tiny_llama


def test_peft_adapter_matches_prefix_path(tmp_path, char_tok):
    cfg = SPTConfig(num_prompts=3, prompt_len=4, init="random", layout="prefix")
    spt = SPTModel(tiny_llama(), cfg)
    model_dir = tmp_path / "base"
    spt.base.save_pretrained(model_dir)
    checkpoint.save(tmp_path / "run", 5, spt.trainable_state_dict(),
                    {"spt": cfg.to_dict(), "model": str(model_dir), "hidden_size": 64})
    export_peft(str(tmp_path / "run"), 2, str(tmp_path / "peft"))

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    ids = torch.tensor([char_tok("given persona: x; context: Q: hi R:").input_ids])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        emb = spt.base.get_input_embeddings()(ids)
        ours = spt.base(inputs_embeds=torch.cat([spt.prompts.weight[2][None], emb], 1)).logits
    assert theirs.shape[1] in (ours.shape[1], ids.shape[1])
    torch.testing.assert_close(theirs[:, -ids.shape[1]:], ours[:, -ids.shape[1]:], rtol=1e-5, atol=1e-5)
    # a different prompt gives different logits: the adapter really carries prompt 2
    with torch.no_grad():
        other = spt.base(inputs_embeds=torch.cat([spt.prompts.weight[0][None], emb], 1)).logits
    assert (other[:, -1] - theirs[:, -1]).abs().max() > 1e-3


def test_exported_files_are_readable_like_checkpoint_files(tmp_path):
    import os

    cfg = SPTConfig(num_prompts=2, prompt_len=2, init="random", layout="prefix")
    spt = SPTModel(tiny_llama(), cfg)
    folder = checkpoint.save(tmp_path / "run", 1, spt.trainable_state_dict(), {"spt": cfg.to_dict()})
    out = export_peft(str(tmp_path / "run"), 1, str(tmp_path / "peft"))
    umask = os.umask(0)
    os.umask(umask)
    files = [out / "adapter_model.safetensors", out / "adapter_config.json", folder / checkpoint.TENSORS,
             folder / checkpoint.CONFIG]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
