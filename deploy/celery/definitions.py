"""The example pipeline (``definitions``) with its steps on Celery workers.

Load it as a module, from the repository root (deploy/celery/workspace.yaml):
``python_module: {module_name: deploy.celery.definitions, working_directory: .}``. Model
stages (pool ``gpu``) run on the ``gpu`` queue; every other step on ``dagster``.
"""

import definitions as example  # the package, not its Definitions: one `defs` here
from longrun_dagster.celery import on_celery

defs = on_celery(example.defs)
