"""
objectives.py — what each pre-training stage of train_pretrain.py optimises. An objective is the
trainee, its data stream, one step's forward/backward and its evaluation; train_pretrain.py's
training loop is the same for all of them:

  NextTokenObjective    stage 0-lm: the LM alone on packed rows of synthetic text
  MultimodalObjective   stages 1-4: the whole model on packed multimodal rows (MiMo-VL report §2.3)
  CellObjective         stage 0-vit: the ViT (+ projector) classifying every 28-px cell of synthetic
                        scenes through a small temporary head (CellClassifier)

A stage's run (train_pretrain.Run) gives each objective its arguments, compute, stage table and
`run.mixture(key)`, the data the stage trains on.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import packing
import synthetic
from evaluate import answer_loss, eval_suites, format_results, heldout_suite, majority_answers, run_suite
from processor import preprocess_image
from training import add_dummy_vision, all_reduce_sum, fail, grad_sync, is_sharded_checkpoint



class NextTokenObjective:
    """Stage 0-lm: the model itself on packed rows of the stage's mixture (`per_rank` rows per
    rank per step, the micro-batches), next-token loss on the labelled tokens."""
    needs_vision = False      # True where every rank must call the vision tower in every step
    extra_files = ()          # files beside the weights that a checkpoint of this stage holds

    def __init__(self, run, key, model, processor, resume_from):
        self.run, self.key, self.model, self.processor = run, key, model, processor
        self.trainee = model

    def start(self, per_rank, step, loader_state):
        a, c = self.run.args, self.run.compute
        self.per_rank = per_rank
        vision_trainable = any(p.requires_grad for p in self.model.visual.parameters())
        self.dummy_vision = vision_trainable or (self.needs_vision and a.fsdp and c.distributed)
        try:
            self.loader = packing.PackedLoader(
                packing.MixtureDataset(self.run.mixture(self.key), "train", a.seed, on_error="skip"),
                self.processor, max_tokens=self.run.stages[self.key].seq_len, chunk_size=a.chunk_size,
                num_workers=a.workers, rank=c.rank, world_size=c.world_size, seed=a.seed, on_too_long="skip")
            if loader_state is not None:
                self.loader.load_state_dict(loader_state)
        except ValueError as e:               # packing.DataError included
            fail(f"stage {self.key}: {e}")
        self.stream = iter(self.loader)

    def next_batch(self):
        try:
            rows = [next(self.stream) for _ in range(self.per_rank)]
        except packing.DataError as e:
            fail(f"stage {self.key}: {e}")
        if self.dummy_vision:
            video = self.run.args.fsdp and self.run.compute.distributed
            rows = [add_dummy_vision(r, self.processor, video=video) for r in rows]
        return rows

    def forward_backward(self, wrapped, rows):
        """The loss is normalised by the number of labelled tokens of the whole global step, so
        any split over ranks and micro-batches gives the same gradient as one big batch."""
        c = self.run.compute
        n_valid = [int((r["labels"][:, 1:] != packing.IGNORE_INDEX).sum()) for r in rows]
        counts = torch.tensor([float(sum(n_valid)), float(sum(r["input_ids"].shape[1] for r in rows))])
        counts = all_reduce_sum(counts, c)
        total = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), device=c.device)
        for i, r in enumerate(rows):
            with grad_sync(wrapped, i == len(rows) - 1), c.autocast():
                out = wrapped(r["input_ids"].to(c.device), labels=r["labels"].to(c.device),
                              cu_seqlens=r["cu_seqlens"].to(c.device), **packing.vision_inputs(r, c.device))
                (out.loss * (n_valid[i] * c.world_size / total)).backward()
            loss_sum += out.loss.detach().float() * n_valid[i]
        loss_sum = all_reduce_sum(loss_sum, c)
        return float(loss_sum) / total, {"tokens": int(counts[1]), "labelled": int(counts[0])}

    def loader_state(self, step):
        return self.loader.state_dict()

    def progress(self, extra, tok_s):
        return f" {tok_s:,.0f} tok/s"

    def split(self, state):
        """-> (MiMoVL weights, extra weights saved beside them)."""
        return state, {}

    @staticmethod
    def evaluate(run, key, model, processor, folder, cache):
        """Held-out text loss per labelled token."""
        a, c = run.args, run.compute
        ds = synthetic.SyntheticDataset(synthetic.stage_mixture(0), "heldout", a.seed)
        samples = [ds[i] for i in range(c.rank, a.eval_n, c.world_size)]
        sums = all_reduce_sum(torch.tensor(answer_loss(model, processor, samples), dtype=torch.float64,
                                           device=c.device), c).tolist()
        res = {"text_loss": sums[0] / max(sums[1], 1)}
        return res, f"stage 0-lm: held-out text loss {res['text_loss']:.3f} (per labelled token)"


class MultimodalObjective(NextTokenObjective):
    """Stages 1-4: the same loss on packed multimodal rows; evaluated on the held-out suite
    (model, majority answer, blank image). Under FSDP2 every rank calls the vision tower in every
    step, so rows without an image (or video) get a dummy one (training.add_dummy_vision)."""
    needs_vision = True

    @staticmethod
    def evaluate(run, key, model, processor, folder, cache):
        a = run.args
        if "suite" not in cache:
            suite, losses = eval_suites(a.eval_tasks)
            cache["suite"] = heldout_suite(a.eval_n, a.seed, suite)
            cache["loss"] = heldout_suite(a.eval_n, a.seed, losses)
            cache["majority"] = majority_answers(suite, seed=a.seed)
        res = run_suite(model, processor, cache["suite"], run.compute, a.eval_batch, cache["majority"],
                        cache["loss"])
        return res, format_results(res, f"stage {key}: held-out suite, {a.eval_n} items per task, greedy")


class CellClassifier(nn.Module):
    """Stage 0-vit's trainee: the class of every 28-px cell (synthetic.CELL_CLASSES) from the
    merged visual token that covers it. The head is temporary: stage 1 drops it and re-initialises
    the merger, keeping only what the ViT blocks learned."""

    def __init__(self, model, n_classes):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.cfg.vision.out_hidden_size, n_classes)

    def forward(self, pixel_values, grid_thw, cell_labels):
        feats = self.model.visual(pixel_values, grid_thw)          # (n_cells, D), raster order
        logits = self.head(feats).float()                          # (n_cells, n_classes)
        loss = F.cross_entropy(logits, cell_labels)
        return loss, (logits.argmax(-1) == cell_labels).sum()


def load_head(head, folder):
    """The 0-vit head saved beside a folder's weights (extra.safetensors, keys head.*)."""
    state = load_file(os.path.join(folder, "extra.safetensors"))
    head.load_state_dict({k[len("head."):]: v for k, v in state.items()})
    return head


class CellBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's share of the 0-vit batch of that step: (pixel values, grids,
    cell labels) of `per_rank` scenes. A pure function of the step, so resuming needs only it."""

    def __init__(self, per_rank, rank, world, seed, split="train"):
        self.per_rank, self.rank, self.world, self.seed, self.split = per_rank, rank, world, seed, split

    def __len__(self):
        return 1 << 40

    def __getitem__(self, step):
        first = (step * self.world + self.rank) * self.per_rank
        pvs, grids, labels = [], [], []
        for i in range(first, first + self.per_rank):
            s = synthetic.classification_sample(i, self.split, self.seed)
            pv, grid = preprocess_image(s["image"], resized_height=s["image"].height,
                                        resized_width=s["image"].width)
            pvs.append(pv)
            grids.append(grid)
            labels += s["cell_labels"]
        return torch.cat(pvs), torch.tensor(grids), torch.tensor(labels)


class CellObjective:
    """Stage 0-vit: ViT + merger + a temporary linear head (CellClassifier) classify every cell of
    synthetic scenes, `per_rank` images per rank per step. The head is saved beside
    the weights as extra.safetensors, which loaders of the model ignore."""
    extra_files = ("extra.safetensors",)

    def __init__(self, run, key, model, processor, resume_from):
        self.run = run
        torch.manual_seed(run.args.seed + 2)
        self.trainee = CellClassifier(model, len(synthetic.CELL_CLASSES))
        if resume_from and not is_sharded_checkpoint(resume_from):      # else it is in dcp/
            load_head(self.trainee.head, resume_from)

    def start(self, per_rank, step, loader_state):
        a, c = self.run.args, self.run.compute
        ds = CellBatches(per_rank, c.rank, c.world_size, a.seed)
        self.stream = iter(torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=packing.SamplerFrom(step), num_workers=a.workers,
            worker_init_fn=packing.worker_init if a.workers else None))

    def next_batch(self):
        return next(self.stream)

    def forward_backward(self, wrapped, batch):
        """Cross-entropy per cell, averaged over the cells of the global batch (all ranks)."""
        c = self.run.compute
        pv, grid, labels = batch
        total = all_reduce_sum(torch.tensor([float(len(labels))]), c).item()
        with c.autocast():
            loss, right = wrapped(pv.to(c.device), grid, labels.to(c.device))
            (loss * (len(labels) * c.world_size / total)).backward()
        sums = torch.stack([loss.detach().float().cpu() * len(labels), right.cpu().float()])
        sums = all_reduce_sum(sums.to(c.device), c).cpu()
        return float(sums[0]) / total, {"cell_acc": float(sums[1]) / total}

    def loader_state(self, step):
        return {"step": step}

    def progress(self, extra, tok_s):
        return f" cell acc {extra['cell_acc']:.2f}"

    def split(self, state):
        model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return model, {k: v for k, v in state.items() if not k.startswith("model.")}

    @staticmethod
    @torch.no_grad()
    def evaluate(run, key, model, processor, folder, cache):
        """Accuracy of the saved head on held-out scenes, beside always answering "empty"."""
        c = run.compute
        head = load_head(nn.Linear(model.cfg.vision.out_hidden_size, len(synthetic.CELL_CLASSES)), folder)
        head = head.to(c.device, model.dtype)
        right = total = empty = 0
        for step in range(c.rank, max(1, run.args.eval_n // 32), c.world_size):
            pv, grid, labels = CellBatches(32, 0, 1, run.args.seed, "heldout")[step]
            logits = head(model.visual(pv.to(c.device, model.dtype), grid)).float()
            right += int((logits.argmax(-1).cpu() == labels).sum())
            total += len(labels)
            empty += int((labels == 0).sum())
        right, total, empty = all_reduce_sum(torch.tensor([right, total, empty], dtype=torch.float64), c).tolist()
        res = {"cell_acc": right / total, "majority": empty / total}
        return res, (f"stage 0-vit: held-out cell accuracy {res['cell_acc']:.3f} "
                     f"(majority 'empty' {res['majority']:.3f}; linear head on the merged tokens)")


OBJECTIVES = {"0-lm": NextTokenObjective, "0-vit": CellObjective, "1": MultimodalObjective,
              "2": MultimodalObjective, "3": MultimodalObjective, "4": MultimodalObjective}
