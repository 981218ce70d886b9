#!/usr/bin/env bash
# Install what the "past one machine" tests need, when missing:
#   requirements-cluster.txt into the venv (Ray for predict --engine ray, psycopg for a PostgreSQL audit log),
#   Debian's postgresql (a throwaway server the audit tests start on a free loopback port; its own cluster is never used).
# Idempotent; never fails the build: without these parts the tests that need them are skipped with a reason.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import ray.data, psycopg" >/dev/null 2>&1; then
  echo "installing requirements-cluster.txt (ray, psycopg) ..."
  "$PY" -m pip install --quiet -r requirements-cluster.txt \
    || echo "warning: could not install requirements-cluster.txt; the Ray and PostgreSQL tests will be skipped"
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql for the audit-log tests (apt-get) ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql) \
      >/dev/null 2>&1 || echo "warning: could not install postgresql; the PostgreSQL audit tests will be skipped"
  else
    echo "note: postgresql missing and apt-get unavailable (or not root); the PostgreSQL audit tests will be skipped"
  fi
fi
exit 0
