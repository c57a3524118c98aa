# `nomad namespace apply namespace.hcl`: polydev's containers live in their own namespace, so
# its token can be scoped to it and its reconcile loop sees nothing else.
name        = "polydev"
description = "polydev runtime containers (docs/runtime.md)"
