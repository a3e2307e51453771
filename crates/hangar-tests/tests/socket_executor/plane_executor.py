#!/usr/bin/env python3
"""A custom executor written against Plane's executor-socket protocol (plane-api.md section 6.6),
used by Hangar's tests to show that such an executor works with a Hangar drone unchanged.

It listens on a unix socket, reads newline-delimited JSON `{"id", "message"}` requests
(`Prepare`, `Spawn`, `Terminate`, `WaitForBackend`) and answers them; it reports backend exits with
`TerminateEvent` and sends one `MetricsMessage` per backend after it starts. Backends are real
`hangar-test-backend` processes (the `image` of the executable is ignored), started in their own
session so they survive this executor: the backends it runs are kept in a state file, so a
restarted executor still knows them (it terminates them and reports their exits).

Test hooks:
  --garbage     on every connection, first send lines the drone must skip: not JSON, an unknown
                message, an answer to an unknown id, an exit event for an unknown backend; and
                answer every Prepare twice (the second answer has an id that is no longer pending).
  --log FILE    append every line received, so a test can see what reached the executor.
Events raised while no drone is connected are kept and sent on the next connection.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import sys


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Executor:
    def __init__(self, args):
        self.args = args
        self.backends = {}  # backend id -> pid
        self.writer = None
        self.queued = []  # events raised while no drone was connected
        if os.path.exists(args.state):
            with open(args.state) as f:
                self.backends = json.load(f)
        for backend_id, pid in list(self.backends.items()):
            # Not our child any more (we restarted): poll for its exit.
            asyncio.get_event_loop().create_task(self.watch_pid(backend_id, pid))

    def save(self):
        tmp = self.args.state + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.backends, f)
        os.replace(tmp, self.args.state)

    def send(self, obj):
        line = (json.dumps(obj) + "\n").encode()
        if self.writer is not None:
            self.writer.write(line)
        elif obj["id"] is None:
            self.queued.append(line)
        # An answer for a connection that is gone is dropped: the drone sends the request again.

    def exited(self, backend_id, exit_code):
        if self.backends.pop(backend_id, None) is not None:
            self.save()
            self.send({"id": None, "message": {"TerminateEvent": {
                "backend_id": backend_id, "exit_code": exit_code}}})

    async def watch_child(self, backend_id, proc):
        code = await proc.wait()
        self.exited(backend_id, 128 - code if code < 0 else code)

    async def watch_pid(self, backend_id, pid):
        while pid_alive(pid):
            await asyncio.sleep(0.05)
        self.exited(backend_id, None)

    async def serve(self, reader, writer):
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        if self.args.garbage:
            for line in [
                "this is not json",
                json.dumps({"id": None, "message": {"NoSuchMessage": 1}}),
                json.dumps({"id": "no-such-request", "message": {"PrepareResult": {"Ok": None}}}),
                json.dumps({"id": None, "message": {"TerminateEvent": {
                    "backend_id": "ba-unknownbackend000", "exit_code": 3}}}),
                "",
            ]:
                writer.write((line + "\n").encode())
        for line in self.queued:
            writer.write(line)
        self.queued = []
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if self.args.log:
                    with open(self.args.log, "a") as f:
                        f.write(line.decode())
                request = json.loads(line)
                asyncio.get_event_loop().create_task(self.answer(request, writer))
        finally:
            if self.writer is writer:
                self.writer = None

    async def answer(self, request, writer):
        request_id = request["id"]
        (name, arg), = request["message"].items()
        result = await getattr(self, name.lower())(arg)
        self.send({"id": request_id, "message": result})
        if name == "Prepare" and self.args.garbage:
            self.send({"id": request_id, "message": result})

    async def prepare(self, config):
        if config["image"] == "fail-prepare":
            return {"PrepareResult": {"Err": "no such image: fail-prepare"}}
        return {"PrepareResult": {"Ok": None}}

    async def spawn(self, arg):
        backend_id, config, key, static_token = arg
        port = free_port()
        env = dict(os.environ)
        env.update(config.get("env", {}))
        env.update({
            "PORT": str(port),
            "SESSION_BACKEND_ID": backend_id,
            "SESSION_BACKEND_KEY": key["key"]["name"] if key else "",
            "SESSION_BACKEND_FENCING_TOKEN": str(key["token"]) if key else "",
        })
        if static_token:
            env["SESSION_BACKEND_STATIC_TOKEN"] = static_token
        proc = await asyncio.create_subprocess_exec(
            self.args.backend, env=env, start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.backends[backend_id] = proc.pid
        self.save()
        asyncio.get_event_loop().create_task(self.watch_child(backend_id, proc))
        self.send({"id": None, "message": {"MetricsMessage": {
            "backend_id": backend_id, "mem_used": 1234, "mem_total": 2345, "mem_active": 100,
            "mem_inactive": 200, "mem_unevictable": 0, "mem_limit": 4294967296,
            "cpu_used": 1500000, "sys_cpu": 10000000000}}})
        return {"SpawnResult": {"Ok": {"container_id": f"proc-{proc.pid}", "port": port}}}

    async def terminate(self, arg):
        backend_id, hard = arg
        pid = self.backends.get(backend_id)
        if pid is None or not pid_alive(pid):
            return {"TerminateResult": {"Ok": False}}
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
        return {"TerminateResult": {"Ok": True}}

    async def waitforbackend(self, arg):
        _backend_id, address = arg
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_event_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.read(5), 1)
                writer.close()
                if head == b"HTTP/":
                    return {"WaitForBackendResult": {"Ok": None}}
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        return {"WaitForBackendResult": {"Err": "StartupTimeout"}}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--log")
    parser.add_argument("--garbage", action="store_true")
    args = parser.parse_args()
    executor = Executor(args)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = await asyncio.start_unix_server(executor.serve, path=args.socket)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
