"""Export: the fp32 weights of a checkpoint (any ZeRO stage) as one safetensors file, in one process,
without the launcher; nothing in the checkpoint is unpickled beyond tensors and allow-listed classes.

    export_safetensors("runs/a/checkpoints", "runs/a/weights.safetensors")
"""

from __future__ import annotations

import os

import torch

from fastclip.train.checkpoint import DS_TAG, CheckpointError, resolve, verify


def export_safetensors(ckpt_dir: str, out_path: str) -> str:
    """Plain fp32 weights of a checkpoint (any ZeRO stage) -> a safetensors file. Works offline, one process."""
    from safetensors.torch import save_file

    from fastclip.train.safe_load import load_pickle, safe_zero_to_fp32

    ckpt_dir = resolve(ckpt_dir)
    verify(ckpt_dir)
    ds_dir = os.path.join(ckpt_dir, DS_TAG)
    zero_files = [
        n for n in os.listdir(ds_dir) if "optim_states" in n and n.startswith(("zero_", "bf16_zero_"))
    ]
    if zero_files:
        import contextlib

        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
            safe_zero_to_fp32() as z,
        ):
            state = z.get_fp32_state_dict_from_zero_checkpoint(
                ckpt_dir, tag=DS_TAG
            )  # chatty: prints progress
    else:  # ZeRO stage 0: DeepSpeed stores the module's state dict as it is
        model_file = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
        loaded = load_pickle(model_file)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
            raise CheckpointError(f"{model_file}: key 'module': expected the model's state dict")
        state = loaded["module"]
    state = {
        k: v.detach().float().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.abspath(ckpt_dir)})
    os.replace(tmp, out_path)
    return out_path
