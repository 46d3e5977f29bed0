#!/usr/bin/env bash
# Device side: keep one carried part of the parity weights (and the meta files) on the machine.
set -euo pipefail
mkdir -p /root/parity
cp .gpu/parity/"$1"/* /root/parity/
[ -d .gpu/parity/meta ] && cp -r .gpu/parity/meta/. /root/parity/
ls -la /root/parity | tail -n +2
