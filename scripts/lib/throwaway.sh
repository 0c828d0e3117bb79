# Shared by the throwaway-*.sh scripts (sourced, not run).

port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# serve_on_free_port OWNER_PID LOGFILE COMMAND...
# Starts COMMAND detached, with @PORT@ in its arguments replaced by a free port, and waits until
# it listens. Sets SERVER_PORT and SERVER_PID. With an OWNER_PID (may be empty), the server is
# stopped once that process has exited, even if it crashed. Returns 1 if it never came up.
serve_on_free_port() {
  local owner_pid="$1" logfile="$2" port pid
  shift 2
  for _ in 1 2 3 4 5; do
    port=$(( 20000 + RANDOM % 40000 ))
    port_is_free "$port" || continue
    setsid nohup "${@//@PORT@/$port}" >"$logfile" 2>&1 </dev/null &
    pid=$!
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      if ! port_is_free "$port"; then
        if [ -n "$owner_pid" ]; then
          setsid nohup bash -c "while kill -0 $owner_pid 2>/dev/null; do sleep 1; done; kill $pid" \
            >/dev/null 2>&1 </dev/null &
        fi
        SERVER_PORT=$port
        SERVER_PID=$pid
        return 0
      fi
      sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
  done
  return 1
}
