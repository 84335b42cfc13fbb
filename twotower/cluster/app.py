"""`twotower.cluster.app:build_app`, the import path of Serve configs deployed before the application
moved to `twotower.cluster.serve.app` (RayService objects and `serve deploy` files in the field still
name it). New configs name the serve path; this alias only keeps the old ones deployable."""

from twotower.cluster.serve.app import build_app

__all__ = ["build_app"]
