#!/usr/bin/env bash
# Device side: keep one carried folder of the parity inputs (.gpu/pg1 or .gpu/pg2) on the machine.
set -euo pipefail
mkdir -p /root/parity
cp -r .gpu/"$1"/. /root/parity/
ls -la /root/parity | tail -n +2
