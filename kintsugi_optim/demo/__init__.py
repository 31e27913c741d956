"""The main job: a small, reproducible study of what Kintsugi optimization does to learning.

Three tasks made in-process (no downloads), each a setting where plain empirical risk
minimisation neglects part of the data:

* ``rare`` — rare-event classification: a minority class of 2% carried by a weak but informative
  feature among distractors. Plain Adam learns to predict the majority class.
* ``spurious`` — spurious correlation (Waterbirds-like): a noisy core feature and a clean spurious
  one agree on 95% of training samples and are independent at test; the groups are
  (label, spurious attribute). Plain Adam leans on the spurious feature and fails the minority
  groups.
* ``hidden`` — the same kind of shortcut with the groups unknown to the learner: three balanced
  classes, a weak feature against a strong spurious one that agrees with the label on 90% of
  training samples. The label-using methods see only the classes, which are balanced, so only
  label-free methods can find the atypical examples.

Each task is learnt by the same small MLP with each method of :data:`METHODS`, over several
seeds; the metrics (accuracy, balanced accuracy, minority recall, worst-group accuracy) and wall
times are reported as mean ± std. Pathways for the reweighting methods marked "[uses labels]"
are the classes (``rare``, ``hidden``) or the groups (``spurious``), which the training loop
knows, as Group DRO assumes. Focal loss, JTT and Kintsugi's sample-level gilding use no labels
beyond the targets (docs/sample-gilding.md).

Layout: :mod:`.tasks` (the data), :mod:`.methods` (the methods and baselines), :mod:`.study`
(training and evaluation), :mod:`.report` (tables, results.json, sigils).

The demo ships inside the package, not in a checkout's ``examples/``: it is the package's main
job (``python -m kintsugi_optim demo``, also the ``kintsugi-demo`` command), so that anyone who
installed the wheel can reproduce the README's tables and judge the method on their own
machine without cloning the repository. It costs about 30 kB of source and no dependency
beyond torch and numpy (matplotlib only for the sigils).
"""

from kintsugi_optim.demo.methods import METHODS, Method, Trainer, methods_for
from kintsugi_optim.demo.report import environment, format_table, report, write_outputs
from kintsugi_optim.demo.study import evaluate, make_model, run_study, train_one
from kintsugi_optim.demo.tasks import TASKS, Task, make_task

__all__ = ["Task", "TASKS", "make_task", "Method", "METHODS", "Trainer", "methods_for",
           "make_model", "evaluate", "train_one", "run_study", "format_table", "report",
           "write_outputs", "environment"]
