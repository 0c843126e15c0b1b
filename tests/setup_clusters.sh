#!/usr/bin/env bash
# Installs what the real-cluster tests need when absent: Debian's slurm-wlm + munge, and iproute2 +
# util-linux (`ip`, `nsenter`, `unshare`) for the two-host network of the multi-node tests
# (tests/launch/two_host.py), and Debian's iso-codes (the known-support demo's data: tests/demo/test_iso*.py).
# Root only; elsewhere the cluster tests report clearly what is missing
# (the two-host tests are skipped where network namespaces cannot be made: not root).
set -u
if [ -x tests/launch/install_slurm.sh ]; then bash tests/launch/install_slurm.sh; fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
{ command -v nsenter && command -v unshare; } >/dev/null 2>&1 || need+=(util-linux)
[ -f /usr/share/iso-codes/json/iso_3166-2.json ] || need+=(iso-codes)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "[setup] installing ${need[*]} (the two-host tests' network namespaces, the demo-lm data)"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
      echo "[setup] apt-get install ${need[*]} FAILED:" >&2
      tail -n 20 "$log" >&2
    fi
    rm -f "$log"
  else
    echo "[setup] two-host tests: missing ${need[*]}; not root, so not installing (they will be skipped)" >&2
  fi
fi
exit 0
