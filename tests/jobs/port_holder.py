"""Rank 0 binds MASTER_ADDR:MASTER_PORT as torch's TCPStore would, and holds it for a second, so
that runs started together overlap: two runs leased the same port if one of them cannot bind.
No torch: dozens of these start in seconds."""

import os
import socket
import time

if os.environ["RANK"] == "0":
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        sock.listen()
        time.sleep(1.0)
