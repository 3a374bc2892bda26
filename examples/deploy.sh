#!/bin/sh
# A stand-in deployment for the demo: reports progress the way SPEC §6 describes and
# records the version it "deployed" in ./deployed/<environment>/<service>.
# A version ending in "-bad" fails, to show retries and rollback.
set -eu
env="$1" service="$2" version="$3"
echo "deploying $service $version to $env (previous: ${RECONCILER_PREVIOUS_VERSION:-none})"
for pct in 10 40 70; do
  printf '{"progress": %d, "message": "rolling out %s (%d%%)"}\n' "$pct" "$service" "$pct"
  sleep "${DEMO_STEP_SECONDS:-0.5}"
done
case "$version" in
  *-bad) echo "health check failed for $service $version" >&2; exit 3 ;;
esac
mkdir -p "deployed/$env"
echo "$version" > "deployed/$env/$service"
printf '{"progress": 100, "message": "%s %s is live"}\n' "$service" "$version"
