-- Nova's classic flavors, public; administrators add and remove others.
INSERT INTO flavors (id, name, vcpus, ram_mb, disk_gb) VALUES
    ('00000000-0000-4000-8000-000000000001', 'm1.tiny', 1, 512, 1),
    ('00000000-0000-4000-8000-000000000002', 'm1.small', 1, 2048, 20),
    ('00000000-0000-4000-8000-000000000003', 'm1.medium', 2, 4096, 40),
    ('00000000-0000-4000-8000-000000000004', 'm1.large', 4, 8192, 80),
    ('00000000-0000-4000-8000-000000000005', 'm1.xlarge', 8, 16384, 160);
