"""The torch-free core the web app and the workers share: settings, the SQL models and the job
queue, the feature store, the run-config schema and its checks, rankings, the job kinds."""
