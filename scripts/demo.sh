#!/usr/bin/env bash
# Installs reconciler into .venv, makes a demo desired-state git repository in ./demo and
# runs the daemon on it in the foreground (Ctrl-C stops it). Safe to run again.
#   DEMO_PORT=9090 bash scripts/demo.sh    # the HTTP API on another port (default 8080)
#   DEMO_DIR=/tmp/demo bash scripts/demo.sh  # the demo somewhere else
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/reconciler ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
fi
demo="${DEMO_DIR:-$root/demo}"   # DEMO_DIR: put the demo elsewhere (the tests do)
port="${DEMO_PORT:-8080}"         # DEMO_PORT: when 8080 is taken
case "$port" in
  ''|*[!0-9]*) echo "demo.sh: DEMO_PORT must be a port number, not '$port'" >&2; exit 2 ;;
esac
# The configuration file keeps the default; an environment override moves the server.
export RECONCILER_SERVER__LISTEN="\"127.0.0.1:$port\""
if [ ! -d "$demo/desired-state/.git" ]; then
  mkdir -p "$demo/desired-state"
  cp examples/desired-state/*.yaml "$demo/desired-state/"
  cp examples/reconciler.toml examples/deploy.sh "$demo/"
  git -C "$demo/desired-state" init --quiet --initial-branch=main
  git -C "$demo/desired-state" -c user.name=Demo -c user.email=demo@example.com add .
  git -C "$demo/desired-state" -c user.name=Demo -c user.email=demo@example.com \
    commit --quiet -m "Initial desired state"
fi
cat <<MSG
reconciler demo: watching $demo/desired-state (branch main)
In another terminal, bump a version and watch it deploy within a fraction of a second:
  cd $demo/desired-state
  sed -i 's/"1.4.2"/"1.4.3"/' staging.yaml && git commit -qam "api 1.4.3"
  $root/.venv/bin/reconciler --config $demo/reconciler.toml history
  curl -s localhost:$port/api/v1/status
MSG
exec .venv/bin/reconciler --config "$demo/reconciler.toml" run
