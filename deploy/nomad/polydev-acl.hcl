# `nomad acl policy apply -description "polydev runtime" polydev-runtime polydev-acl.hcl`, then
# `nomad acl token create -name polydev -policy polydev-runtime` → POLYDEV_NOMAD_TOKEN.
# submit-job covers register and deregister (stop + purge); read-job covers allocations and
# the Allocation topic of the event stream.
namespace "polydev" {
  capabilities = ["submit-job", "read-job", "list-jobs"]
}
