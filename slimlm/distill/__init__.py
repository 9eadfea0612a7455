"""Knowledge distillation and fine-tuning: one trainer (`trainer.train`), objectives one per file.

- `ce`: plain next-token fine-tuning (the baseline);
- `kd`: Hinton et al.'s knowledge distillation (forward KL on softened logits, CE mix), or token-level
  reverse KL;
- `gkd`: GKD, on-policy distillation with the generalized JSD(beta);
- `minillm`: MiniLLM, sequence-level reverse KL by policy gradient (single-step decomposition,
  teacher-mixed sampling, length normalisation);
- `hidden`: layer-wise hidden-state matching (TinyBERT's L_hidn) with logit distillation;
- `ted`: TED, task-aware filters learnt on each model, then distillation through them.

Each is a recipe stage that runs after the compression stages with the uncompressed model as the teacher
(`slimlm.distill.stage`), and a method of `slimlm distill --teacher T --student S`.
"""

from slimlm.distill.ce import CrossEntropy
from slimlm.distill.data import Batch, TrainingData, instruction_examples, read_instruction_pairs, token_segments
from slimlm.distill.gkd import GeneralizedKD
from slimlm.distill.hidden import HiddenStateDistillation
from slimlm.distill.kd import KnowledgeDistillation
from slimlm.distill.minillm import MiniLLM
from slimlm.distill.objective import check_same_vocabulary
from slimlm.distill.ted import TaskAwareDistillation
from slimlm.distill.trainer import Objective, TrainingConfig, TrainingResult, train

__all__ = ["Batch", "CrossEntropy", "GeneralizedKD", "HiddenStateDistillation", "KnowledgeDistillation", "MiniLLM",
           "Objective", "TaskAwareDistillation", "TrainingConfig", "TrainingData", "TrainingResult",
           "check_same_vocabulary", "instruction_examples", "read_instruction_pairs", "token_segments", "train"]
