"""Teachers held in memory beside the student and run on each training batch (online and on-policy KD).

On a batch of SFT rows every teacher reads the student's rows. On sampled completions (prompt +
completion rows, ``distill.rollout.completions``) a teacher with its own chat template reads the prompt
in its template followed by the same completion tokens, its end-of-turn in place of the student's; its
mass on its end-of-turn moves onto the student's (``merge_token``, as the cache's alignment does), so
its rows are the student's completion positions, one for one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distill.data.batch import TokenBatch
from distill.data.batching import pad_token_id
from distill.data.prompt_datamodule import padded
from distill.data.templates import ChatTemplate
from distill.rollout.completions import Completions, rollout_batch
from distill.targets import SparseTargets
from distill.teacher.alignment import end_of_turn_id, same_template
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import Sparsity


class OnlineTeachers:
    def __init__(self, teachers: Sequence[Teacher], k: int, tokenizer: str | None) -> None:
        self.teachers = list(teachers)
        self.module = TeacherModule(self.teachers, Sparsity(k=k), tokenizer=tokenizer)
        self._models: list[nn.Module] = []

    @property
    def names(self) -> list[str]:
        return [t.key for t in self.teachers]

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.module.tokenizer

    def models(self, device: torch.device) -> list[nn.Module]:
        """Every teacher, loaded on first use (all stay loaded: they run on every batch)."""
        if not self._models:
            self.module.to(device)
            # the module frees the previous teacher when it loads the next; this list keeps them all
            self._models = [self.module.teacher_model(i) for i in range(len(self.teachers))]
        return self._models

    @torch.no_grad()
    def targets(self, batch: TokenBatch) -> list[SparseTargets]:
        """Each teacher's sparse distribution at the trainable positions of the student's rows."""
        models = self.models(batch.input_ids.device)
        return [self.module.batch_targets(model, batch)[0] for model in models]

    @torch.no_grad()
    def completion_targets(
        self,
        batch: TokenBatch,
        completions: Completions,
        messages: Sequence[Sequence[dict]],
        student_template: ChatTemplate | None,
    ) -> list[SparseTargets]:
        """Each teacher's sparse distribution at the completion positions of ``batch`` (prompt +
        completion rows); a teacher with its own template reads each row's prompt, ``messages``, in it."""
        models = self.models(batch.input_ids.device)
        out = []
        for index, model in enumerate(models):
            template = self.module.teacher_template(index)
            if template is None or same_template(template, student_template):
                out.append(self.module.batch_targets(model, batch)[0])
                continue
            rows, merge = self.teacher_rows(messages, completions, template, student_template)
            out.append(self.module.batch_targets(model, rows, merge=merge)[0])
        return out

    def teacher_rows(
        self,
        messages: Sequence[Sequence[dict]],
        completions: Completions,
        template: ChatTemplate,
        student_template: ChatTemplate | None,
    ) -> tuple[TokenBatch, tuple[int, int] | None]:
        """The completions after the prompts rendered in the teacher's ``template``, and the (teacher's,
        student's) end-of-turn ids to merge when the two differ."""
        tokenizer = self.tokenizer
        texts = [template.render(tokenizer, list(m), generation_prompt=True) for m in messages]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template renders the BOS
        prompt_ids, prompt_mask = padded(encoded, pad_token_id(tokenizer), left=True)
        ids = completions.ids
        theirs, ours = end_of_turn_id(tokenizer, template), end_of_turn_id(tokenizer, student_template)
        merge = None
        if theirs is not None and ours is not None and theirs != ours:
            ids = torch.where(completions.mask & (ids == ours), theirs, ids)
            merge = (theirs, ours)
        completions = Completions(ids, completions.mask, completions.stopped)
        device = ids.device
        return rollout_batch(prompt_ids.to(device), prompt_mask.long().to(device), completions), merge
