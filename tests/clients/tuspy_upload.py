#!/usr/bin/env python3
"""Uploads a file with tuspy (the Python tus client), unchanged.

usage: tuspy_upload.py create ENDPOINT FILE CHUNK   # POST creation on ENDPOINT, then PATCHes
       tuspy_upload.py resume UPLOAD_URL FILE CHUNK # the Backend.AI flow: HEAD, then PATCHes

Prints "url <upload url>" once known and "offset <n>" after every acknowledged chunk, then
"done <n>". The test kills it mid-upload and runs it again in resume mode.
"""
import sys

from tusclient import client

mode, url, path, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = client.TusClient(url)
if mode == "create":
    up = c.uploader(file_path=path, chunk_size=chunk, retries=3, retry_delay=1)
    up.set_url(up.create_url())
    up.offset = 0
else:
    up = c.uploader(file_path=path, chunk_size=chunk, url=url, retries=3, retry_delay=1)
    print(f"resumed {up.offset}", flush=True)
print(f"url {up.url}", flush=True)
size = up.get_file_size()
while up.offset < size:
    up.upload_chunk()
    print(f"offset {up.offset}", flush=True)
print(f"done {up.offset}", flush=True)
