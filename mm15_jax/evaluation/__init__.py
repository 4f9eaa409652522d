"""Task metrics, the JSONL benchmark runner and the built-in held-out evaluation."""

from mm15_jax.evaluation.builtin_eval import baseline_accuracy, evaluate_builtin
from mm15_jax.evaluation.metrics import anls, exact_match, grounding_accuracy, iou, normalize_answer, vqa_accuracy
from mm15_jax.evaluation.runner import evaluate
