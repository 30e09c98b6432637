"""The sync service and its device client.

- ``protocol``: the wire schemas both sides share (no torch, no server dependencies).
- ``client``: what the device agent uses (enroll, heartbeat/poll, verified resumable downloads, uploads).
- ``tuf_repo`` / ``tuf_client``: release metadata with TUF (python-tuf's Metadata API on the service, its ngclient
  updater on the device).
- ``db``, ``blobs``, ``auth``, ``rollout``, ``app``: the service (``edgekit sync serve``): FastAPI on SQLite or
  PostgreSQL through SQLAlchemy (Alembic migrations), blobs on the filesystem or S3-compatible storage.
"""
