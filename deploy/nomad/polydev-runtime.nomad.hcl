# The job polydev registers for each runtime container (one per warm container), as HCL for
# review and for running one by hand (`nomad job run -var ... polydev-runtime.nomad.hcl`).
# polydev itself submits the same job as JSON through POST /v1/jobs (runtime::nomad::job):
# its ID is `polydev-<runtime_containers.id>`, and POLYDEV_BOOTSTRAP is a fresh secret per
# container whose SHA-256 is in runtime_containers.bootstrap_hash.

variable "container_id" {
  type        = string
  description = "runtime_containers.id of this container"
}

variable "bootstrap" {
  type        = string
  description = "the per-container bootstrap secret the agent registers its public key with"
}

variable "provider" {
  type    = string
  default = "anthropic"
}

variable "server_url" {
  type        = string
  description = "where the agent reaches polydev (POLYDEV_SERVER)"
}

variable "agent_path" {
  type    = string
  default = "/opt/polydev/polydev-agent"
}

job "polydev-runtime" {
  id          = "polydev-${var.container_id}"
  type        = "batch"
  namespace   = "polydev"
  datacenters = ["*"]

  meta {
    polydev = "runtime"
  }

  group "agent" {
    count = 1

    # A container that dies is destroyed and replaced by polydev's reconcile loop: Nomad must
    # neither restart nor reschedule it (a new agent would hold an unregistered key).
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    ephemeral_disk {
      size = 300
    }

    task "agent" {
      # `exec`: chroot + cgroups + namespaces on the client, the agent binary from the node.
      # (With `docker`, set `image` to an image holding the agent and the provider CLIs.)
      driver = "exec"

      config {
        command = var.agent_path
        args    = ["serve"]
      }

      env {
        POLYDEV_BOOTSTRAP = var.bootstrap
        POLYDEV_CONTAINER = var.container_id
        POLYDEV_PROVIDER  = var.provider
        POLYDEV_SERVER    = var.server_url
      }

      resources {
        cpu    = 500
        memory = 512
      }

      kill_timeout = "5s"
    }
  }
}
