#!/usr/bin/env bash
# Installs Debian's slurm-wlm + munge (the real-cluster tests need slurmctld, slurmd, munged, sbatch)
# when they are absent. Idempotent and silent when already installed; root only. Not root and not
# installed: print what to do and exit 0, so the cluster tests then fail with the same message
# (they are never skipped).
set -u
need=()
for bin in slurmctld slurmd munged mungekey sbatch; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] Slurm test cluster: missing ${need[*]}; not root, so not installing." >&2
  echo "[setup]   run as root: apt-get install -y slurm-wlm munge   (the cluster tests will fail until then)" >&2
  exit 0
fi

echo "[setup] installing slurm-wlm + munge (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: never let the package scripts start the system daemons; the tests start
# their own munged/slurmctld/slurmd on loopback with configs in a temp dir.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
  echo "[setup] apt-get install slurm-wlm munge FAILED:" >&2
  tail -n 30 "$log" >&2
fi
rm -f "$log"
[ "$created_policy" -eq 1 ] && rm -f "$policy"
for bin in slurmctld slurmd munged mungekey sbatch; do
  command -v "$bin" >/dev/null 2>&1 || echo "[setup] still missing after install: $bin" >&2
done
exit 0
