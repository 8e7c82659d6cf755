#!/bin/sh
# The root filesystem is read-only; /run is a tmpfs where sshd keeps its privsep dir and pid.
set -e
mkdir -p /run/sshd
chmod 0755 /run/sshd
if [ ! -s /etc/ssh/hostkeys/ssh_host_ed25519_key ]; then
  echo "storage-agent: no host key mounted at /etc/ssh/hostkeys" >&2
  exit 1
fi
exec /usr/sbin/sshd -D -e
