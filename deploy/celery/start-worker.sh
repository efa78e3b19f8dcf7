#!/usr/bin/env bash
# Starts one dagster-celery worker in the foreground (run one per node, and one per GPU).
#
#   deploy/celery/start-worker.sh NAME [QUEUE...]
#
# QUEUE defaults to `dagster` (dagster-celery's queue for every step without a pool).
# A GPU worker serves the `gpu` queue with one slot: give it the device, e.g.
#   CUDA_VISIBLE_DEVICES=0 deploy/celery/start-worker.sh gpu0 gpu
#   CUDA_VISIBLE_DEVICES=1 deploy/celery/start-worker.sh gpu1 gpu
#   LONGRUN_CELERY_CONCURRENCY=4 deploy/celery/start-worker.sh cpu dagster
#
# Environment: DAGSTER_HOME (holding deploy/dagster.yaml), DAGSTER_PG_URL,
# DAGSTER_CELERY_BROKER, DAGSTER_CELERY_BACKEND, the code location's own variables
# (LONGRUN_BASE_URI, AWS_ENDPOINT_URL_S3, AWS_*), and the code importable (run it from the
# repository root, or set PYTHONPATH). LONGRUN_CELERY_CONCURRENCY: slots (default 1).
# LONGRUN_CELERY_PRELOAD: a code location module to import when the worker starts (e.g.
# deploy.celery.definitions), so its first step does not pay for the import (and a broken
# import shows at once).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:?usage: $0 NAME [QUEUE...]}"
shift
queues=()
for queue in "${@:-dagster}"; do
  queues+=(-q "$queue")
done
preload=()
[ -z "${LONGRUN_CELERY_PRELOAD:-}" ] || preload=(-i "$LONGRUN_CELERY_PRELOAD")
exec dagster-celery worker start -A dagster_celery.app -y "$here/celery_config.yaml" \
  -n "$name" "${queues[@]}" "${preload[@]}" -- --concurrency "${LONGRUN_CELERY_CONCURRENCY:-1}"
