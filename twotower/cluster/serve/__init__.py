"""The Ray Serve application: one ingress deployment (gRPC + OpenAI HTTP) in front of autoscaled
tower-pair replicas.

    config         ServeConfig: the deployment's one validated config (Helm's `serve:` values mirror it)
    deploy         the declarative Serve config of a ServeConfig, and the dashboard REST calls (no Ray)
    app            build_app: the deployments, bound (the import path Serve configs name)
    server         TowerPairServer: what one replica runs (a tower pair, an AsyncEngine, metrics)
    handle_client  the ingresses' ServerClient over a DeploymentHandle
    metrics        Prometheus metrics through Ray's metrics API
"""
