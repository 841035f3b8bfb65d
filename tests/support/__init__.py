"""What tests share: settings built from specs, Airflow helpers, reference implementations, fakes."""
