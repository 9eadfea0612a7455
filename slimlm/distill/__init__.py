"""Knowledge distillation and fine-tuning: one trainer (`trainer.train`), objectives one per file.

- `ce`: plain next-token fine-tuning (the baseline);
- `kd`: Hinton et al.'s knowledge distillation (forward KL on softened logits, CE mix), or token-level
  reverse KL;
- `gkd`: GKD, on-policy distillation with the generalized JSD(beta);
- `hidden`: layer-wise hidden-state matching (TinyBERT's L_hidn) with logit distillation.

Each is a recipe stage that runs after the compression stages with the uncompressed model as the teacher
(`slimlm.distill.stage`), and a method of `slimlm distill --teacher T --student S`.
"""
