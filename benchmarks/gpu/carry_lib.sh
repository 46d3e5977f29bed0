# CPU machine, sourced by the packing scripts: what a device call may carry. A call sends the tracked
# tree and its carry folders, 64 MiB in all (/work/.library/device/README.md), so a folder packed for
# a call gets what the tree leaves.
CALL_CARRY_LIMIT_BYTES=$(( 64 * 1024 * 1024 ))

tracked_tree_bytes() {  # the bytes of the files git tracks, as a call sends them
  git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}
