"""
data.py — everything between raw inputs and token tensors.

  1. Image and video preprocessing (qwen-vl-utils + Qwen2VLImageProcessor semantics, SPEC §4.2, §5)
  2. Tokenizer, chat template and the Processor (SPEC §2.3-§2.6)
  3. The synthetic world: scenes, task generators, stage mixtures (SPEC §6.2-§6.4)
  4. JSONL datasets for real data
  5. Tokenizer training for from-scratch runs
  6. Packing, label masks and the DataLoader

This file stands on its own: it imports neither the model nor the kernels.
"""

# =============================================================================
# 1-2. Preprocessing, tokenizer, chat template, Processor
# (section owned by the preprocessing work; keep edits inside these markers)
# =============================================================================

# ----- end of section 1-2 -----

# =============================================================================
# 3-6. Synthetic world, JSONL datasets, tokenizer training, packing
# (section owned by the data work; keep edits inside these markers)
# =============================================================================

# ----- end of section 3-6 -----
