#!/bin/sh
# Start redis-server with the ACL users of users.acl, each with its password from the
# environment: REDIS_WORKER_PASSWORD, REDIS_CLIENT_PASSWORD, REDIS_ADMIN_PASSWORD (one per
# `user NAME` line: REDIS_<NAME>_PASSWORD, required). Only the passwords' SHA-256 hashes are
# written, to a file of its own outside the repository (ACL_OUT, default /tmp/users.acl).
# MODELWORKERS_REDIS_PASSWORD, when set, keeps the default user on with full access (the layout without
# ACL users); unset, the default user stays off. Arguments are passed on to redis-server.
# The rules themselves: docs/security.md.
set -eu

here=$(dirname "$0")
acl_in=${ACL_FILE:-$here/users.acl}
acl_out=${ACL_OUT:-/tmp/users.acl}

sha256() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }

umask 077
: >"$acl_out"
while IFS= read -r line || [ -n "$line" ]; do
    case $line in
    "user default "*)
        if [ -n "${MODELWORKERS_REDIS_PASSWORD:-}" ]; then
            echo "user default on #$(sha256 "$MODELWORKERS_REDIS_PASSWORD") ~* &* +@all" >>"$acl_out"
        else
            echo "user default off" >>"$acl_out"
        fi
        ;;
    "user "*)
        rest=${line#user }
        name=${rest%% *}
        var=REDIS_$(printf '%s' "$name" | tr '[:lower:]-' '[:upper:]_')_PASSWORD
        eval "password=\${$var:-}"
        if [ -z "$password" ]; then
            echo "start-redis.sh: $var is not set (the password of the Redis user '$name')" >&2
            exit 2
        fi
        echo "user $name #$(sha256 "$password") ${rest#"$name" }" >>"$acl_out"
        ;;
    "") ;;
    *)
        echo "start-redis.sh: $acl_in: not a user line: $line" >&2
        exit 2
        ;;
    esac
done <"$acl_in"

exec redis-server --aclfile "$acl_out" "$@"
