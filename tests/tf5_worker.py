"""Run under a Python that has transformers 5.x (see tests/test_checkpoint.py::test_transformers5_*).

    python tf5_worker.py load  CKPT INPUTS OUT   # logits of CKPT on INPUTS (safetensors) -> OUT
    python tf5_worker.py save  CKPT OUT_DIR      # re-save CKPT with transformers 5 naming
"""
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

cmd = sys.argv[1]
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
if cmd == "load":
    inp = load_file(sys.argv[3])
    ids = inp["input_ids"]
    cfg = model.config
    # transformers 5 builds 3-D positions only when told which tokens are image tokens (its `get_rope_index`)
    mm = (ids == cfg.image_token_id).long()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                       mm_token_type_ids=mm).logits
    save_file({"logits": logits.contiguous()}, sys.argv[4])
elif cmd == "save":
    model.save_pretrained(sys.argv[3])
print("ok")
