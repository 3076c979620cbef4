"""The paper's lm-evaluation-harness group: `--tasks paper` / `eval.harness_tasks=paper`.

Shi et al. (2024) report an lm-evaluation-harness group (MMLU, PIQA, OpenBookQA, HellaSwag,
LAMBADA, multilingual LAMBADA, WSC273, WinoGrande, ARC, CoQA, GSM8K CoT, BBH CoT few-shot,
TruthfulQA MC2, ToxiGen, ETHICS) plus judged generation benchmarks. Below, each as lm-eval
0.4.13 names it, with its few-shot setting and why.

Few-shot choices: the authors' results script was not available to us, so no setting below is
taken from it; each is lm-eval's own default for the task (None: the task file's
`num_fewshot`, 0 when it sets none), which is what their harness run used unless it passed
`--num_fewshot`. Tasks whose files fix their shots say so. `--num-fewshot K` overrides every
task except those whose file pins 0 shots (lm-eval's rule).

Left out, as the docs say: HumanEval (it executes generated code), AlpacaEval and MT-Bench
(judged by another model; `python -m im_jax.eval generate` writes AlpacaEval's input format).
"""

import dataclasses

GROUP = "paper"


@dataclasses.dataclass(frozen=True)
class PaperTask:
  name: str  # lm-eval's task, group or tag name
  num_fewshot: int | None  # None: the task file's default (0 when it sets none)
  note: str


TASKS = (
    PaperTask("mmlu", None, "group of 57 subjects; 0-shot (lm-eval default)"),
    PaperTask("piqa", None, "0-shot (lm-eval default)"),
    PaperTask("openbookqa", None, "0-shot (lm-eval default)"),
    PaperTask("hellaswag", None, "0-shot (lm-eval default)"),
    PaperTask("lambada_openai", None, "LAMBADA (OpenAI's version), 0-shot"),
    PaperTask("lambada_multilingual", None,
              "tag: lambada_openai_mt_{en,de,es,fr,it}, 0-shot"),
    PaperTask("wsc273", None, "0-shot (lm-eval default)"),
    PaperTask("winogrande", None, "0-shot (lm-eval default)"),
    PaperTask("arc_easy", None, "ARC-Easy, 0-shot (lm-eval default)"),
    PaperTask("arc_challenge", None, "ARC-Challenge, 0-shot (lm-eval default)"),
    PaperTask("coqa", None, "conversational QA, generation, 0-shot"),
    PaperTask("gsm8k_cot", None, "chain-of-thought; its file fixes 8 exemplars"),
    PaperTask("bbh_cot_fewshot", None, "group of 27 tasks; its files fix 3 CoT exemplars"),
    PaperTask("truthfulqa_mc2", None, "0-shot; its file's prompt holds 6 QA examples"),
    PaperTask("toxigen", None, "0-shot (lm-eval default)"),
    PaperTask("hendrycks_ethics", None, "tag: ethics_cm, _deontology, _justice, "
              "_utilitarianism, _virtue; 0-shot"),
)


def names() -> list[str]:
  return [t.name for t in TASKS]


def fewshot_settings() -> dict[str, int]:
  """Explicit few-shot counts by lm-eval task name (none today: see the module docstring)."""
  return {t.name: t.num_fewshot for t in TASKS if t.num_fewshot is not None}
